"""The Triton kernel tests' cases for the device their script runs on (the scripts run in a
fresh process: tests/test_step_graph.interpret and in_subprocess)."""

import torch


def for_device(cases: list[tuple], device: str) -> list[tuple]:
    """cases (dtype, tolerance, ...) as they can run on `device`: on a CPU, under Triton's
    interpreter, the fp32 ones alone (its tl.dot of bf16 tiles is wrong: 2.7e10 off at 16 x 16);
    on a GPU, the fp32 ones to 5e-3 (tl.dot of fp32 tiles is TF32 there, as in mamba-ssm's
    kernels)."""
    if device == "cpu":
        return [case for case in cases if case[0] == torch.float32]
    return [(d, 5e-3 if d == torch.float32 else tol, *rest) for d, tol, *rest in cases]
