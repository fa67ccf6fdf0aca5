"""Our Mamba-2 mixer against mamba-ssm's own `Mamba2` module on one GPU, same shape, same run.

    source benchmarks/gpu_setup.sh && python3 benchmarks/gpu_mamba_block.py [--json OUT]

Both modules get the same weights (the parameter names coincide). Reports, for d_model 4096,
8 groups, state 128, head 64, chunk 128, 8 x 4096 tokens:
- parity: output and every gradient of our fused path (`model.kernels = "auto"`: mamba-ssm's
  fused conv + SSD + gated norm) and of our chunked-scan path against mamba-ssm's module, and of
  both against our pure-PyTorch reference in fp32 (relative L2, ||a - b|| / ||b||);
- forward and forward+backward milliseconds (median of CUDA-event timings) for mamba-ssm's
  module, our fused path, our chunked-scan path (`ssd_mamba_ssm` with the torch conv and norm),
  with bf16 parameters, and with fp32 parameters under bf16 autocast (how the trainer runs).
The issue's goal: ours within 5% of mamba-ssm's module, forward+backward.
"""

import argparse
import json
import statistics

import torch
from gpu_kernels import rel_l2  # this script's folder is on sys.path

from toolkit.model.kernels import fused_mamba_available, ssd_mamba_ssm
from toolkit.model.mamba2 import Mamba2Mixer
from toolkit.model.ssd import ssd_chunked

SHAPE = dict(d_model=4096, d_state=128, head_dim=64, groups=8, chunk=128, batch=8, seq=4096)


def theirs() -> torch.nn.Module:
    from mamba_ssm.modules.mamba2 import Mamba2

    s = SHAPE
    return Mamba2(
        s["d_model"],
        d_state=s["d_state"],
        d_conv=4,
        expand=2,
        headdim=s["head_dim"],
        ngroups=s["groups"],
        chunk_size=s["chunk"],
        rmsnorm=True,
        norm_before_gate=False,
        bias=False,
        conv_bias=True,
    )


def ours(reference: torch.nn.Module, *, fused: bool, ssd=ssd_mamba_ssm) -> Mamba2Mixer:
    s = SHAPE
    m = Mamba2Mixer(
        s["d_model"],
        d_state=s["d_state"],
        head_dim=s["head_dim"],
        num_groups=s["groups"],
        expand=2,
        d_conv=4,
        chunk_size=s["chunk"],
        ssd=ssd,
        fused=fused,
    )
    m.load_state_dict(reference.state_dict(), strict=True)
    return m


def run(module: torch.nn.Module, u: torch.Tensor, grad: torch.Tensor, autocast: bool):
    """Output and gradients (input first, then parameters by name)."""
    u = u.detach().clone().requires_grad_()
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        y = module(u)
    y.backward(grad)
    grads = {"input": u.grad} | {n: p.grad for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return y.detach(), grads


def timed(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--no-parity", action="store_true", help="timings only")
    parser.add_argument(
        "--bf16-params-only", action="store_true", help="time bf16 parameters only, not autocast"
    )
    args = parser.parse_args()
    assert fused_mamba_available(), "mamba-ssm and causal-conv1d must import (gpu_setup.sh)"
    torch.manual_seed(0)
    s, results = SHAPE, {"shape": SHAPE}
    ref = theirs().cuda()
    mixers = {
        "mamba_ssm Mamba2": ref,
        "ours fused": ours(ref, fused=True).cuda(),
        "ours chunked scan": ours(ref, fused=False).cuda(),
    }

    # Parity, on a shorter batch (the fp32 reference keeps every chunk's intermediates).
    parity = {}
    if not args.no_parity:
        u = torch.randn(2, 1024, s["d_model"], device="cuda")
        grad = torch.randn_like(u)
        reference = ours(ref, fused=False, ssd=ssd_chunked).cuda().float()
        want_y, want_g = run(reference, u, grad, False)
    for name, m in {} if args.no_parity else mixers.items():
        for label, autocast in (("fp32", False), ("bf16 autocast", True)):
            y, g = run(m, u, grad, autocast)
            errors = {"y": rel_l2(y, want_y)} | {k: rel_l2(v, want_g[k]) for k, v in g.items()}
            parity[f"{name}, {label}"] = errors
            print(f"{name:18} {label:13} max rel L2 {max(errors.values()):.1e}: {errors}")
    results["parity_vs_fp32_reference"] = parity

    u = torch.randn(s["batch"], s["seq"], s["d_model"], device="cuda")
    grad = torch.randn_like(u)
    timings = {}
    configs = [("bf16 params", torch.bfloat16, False)]
    if not args.bf16_params_only:
        configs.append(("fp32 params, bf16 autocast", torch.float32, True))
    for label, dtype, autocast in configs:
        x, gx = u.to(dtype), grad.to(dtype)
        for name, m in mixers.items():
            m.to(dtype)

            def forward(m=m, x=x, autocast=autocast) -> None:
                with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                    m(x)

            fwd = timed(forward)
            both = timed(lambda m=m, x=x, gx=gx, ac=autocast: run(m, x, gx, ac))
            timings[f"{name}, {label}"] = {"forward_ms": fwd, "forward_backward_ms": both}
            print(f"{name:18} {label:27} fwd {fwd:6.2f} ms  fwd+bwd {both:6.2f} ms")
        base = timings[f"mamba_ssm Mamba2, {label}"]["forward_backward_ms"]
        ratio = timings[f"ours fused, {label}"]["forward_backward_ms"] / base
        print(f"{label}: ours fused / mamba_ssm Mamba2, fwd+bwd = {ratio:.3f} (goal <= 1.05)")
        timings[f"ratio ours fused / mamba_ssm, {label}"] = ratio
    results["timings"] = timings
    results["torch"] = torch.__version__
    results["device"] = torch.cuda.get_device_name(0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
