"""The Mamba-2 mixer's gated RMSNorm alone, forward and backward: mamba-ssm's kernels (what the
fused training op runs) against ours in Triton (toolkit/model/gated_norm_kernel.py), z read in
place from in_proj's output at a recipe's mixer widths. Milliseconds and TB/s over the bytes
each pass must move (forward: y and z read, out written; backward: y, z and the output's
gradient read, y's and z's gradients written), and the largest differences between the two.

    python3 benchmarks/gated_norm.py [--recipe recipes/800m_hybrid.toml] [--batch 8]
        [--seq 4096] [--repeats 20] [--json OUT] [--sweep]

--sweep also times ours at other tilings (elements a tile, the backward's rows a program, warps
a program: gated_norm_kernel.py's constants), each against the default's numbers.

Needs CUDA and mamba-ssm for the comparison; on a CPU only ours runs, under Triton's
interpreter when TRITON_INTERPRET=1 (a check that the script runs, no timing worth reading).
"""

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cross_entropy import timed_ms  # noqa: E402
from train_throughput import write_json  # noqa: E402

from toolkit.config import load_recipe  # noqa: E402
from toolkit.model import gated_norm_kernel  # noqa: E402
from toolkit.model.fused_mamba import norm_backward, norm_forward  # noqa: E402
from toolkit.model.kernels import mamba_ssm_available  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    model = load_recipe(args.recipe).model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d_inner, groups = model.mamba_expand * model.hidden_size, model.mamba_num_groups
    width = 2 * d_inner + 2 * groups * model.mamba_state_dim + model.mamba_heads  # in_proj's
    rows = args.batch * args.seq
    torch.manual_seed(0)
    dtype = torch.bfloat16
    z = torch.randn(rows, width, device=device, dtype=dtype)[:, :d_inner]
    y = torch.randn(rows, d_inner, device=device, dtype=dtype)
    weight = 1 + 0.1 * torch.randn(d_inner, device=device)
    dout = torch.randn(rows, d_inner, device=device, dtype=dtype)
    dz = torch.empty_like(y)
    pass_bytes = rows * d_inner * 2
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "rows": rows, "channels": d_inner, "groups": groups, "ms": {}}  # fmt: skip
    eps = model.norm_eps
    backends = ["triton"] + (["mamba_ssm"] if mamba_ssm_available() else [])
    outputs = {}
    for name in backends:  # the fused op's two norms, as it calls them
        fwd = functools.partial(norm_forward, y, z, weight, groups, eps, name)
        out, rstd = fwd()
        bwd = functools.partial(norm_backward, dout, y, z, weight, rstd, groups, eps, dz, name)
        dy, dw = bwd()
        outputs[name] = (out.float(), dy.float(), dz.float().clone(), dw.float())
        ms = [timed_ms(fwd, args.repeats, device), timed_ms(bwd, args.repeats, device)]
        result["ms"][name] = {"forward": ms[0], "backward": ms[1]}
        print(f"{name:9}: forward {ms[0]:7.3f} ms ({3 * pass_bytes / ms[0] / 1e9:5.2f} TB/s), "
              f"backward {ms[1]:7.3f} ms ({5 * pass_bytes / ms[1] / 1e9:5.2f} TB/s)")  # fmt: skip
    if args.sweep:
        result["sweep"] = sweep(y, z, weight, groups, eps, dout, dz, outputs["triton"], args)
    if "mamba_ssm" in outputs:
        for label, a, b in zip(("out", "dy", "dz", "dweight"), outputs["triton"], outputs["mamba_ssm"]):  # fmt: skip
            diff = largest_difference(a, b)
            result[f"max_rel_diff_{label}"] = diff
            print(
                f"ours against mamba-ssm's, {label}: largest difference {diff:.1e} of the largest"
            )
    return result


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a - b| as a fraction of b's largest magnitude."""
    return float((a - b).abs().max() / b.abs().max())


def sweep(
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    eps: float,
    dout: torch.Tensor,
    dz: torch.Tensor,
    want: tuple[torch.Tensor, ...],
    args: argparse.Namespace,
) -> dict:
    """Ours at each tiling: {setting: {forward ms, backward ms, largest difference from the
    default's outputs}}; the module's constants are put back after."""
    k = gated_norm_kernel
    saved = (k.ELEMENTS_PER_TILE, k.BACKWARD_ELEMENTS_PER_TILE, k.ROWS_PER_PROGRAM,
             k.FORWARD_WARPS, k.BACKWARD_WARPS)  # fmt: skip
    device, out = y.device, {}
    try:
        for tile in (4096, 8192, 16384):
            for warps in (4, 8):
                k.ELEMENTS_PER_TILE, k.BACKWARD_ELEMENTS_PER_TILE = tile, tile
                k.FORWARD_WARPS = warps
                fwd = functools.partial(norm_forward, y, z, weight, groups, eps, "triton")
                o, rstd = fwd()
                forward_ms = timed_ms(fwd, args.repeats, device)  # the rows are the backward's
                for rows in (64, 128, 512):
                    k.ROWS_PER_PROGRAM, k.BACKWARD_WARPS = rows, warps
                    bwd = functools.partial(norm_backward, dout, y, z, weight, rstd, groups, eps,
                                            dz, "triton")  # fmt: skip
                    dy, dw = bwd()
                    diff = max(largest_difference(a.float(), b)
                               for a, b in zip((o, dy, dz, dw), want))  # fmt: skip
                    ms = [forward_ms, timed_ms(bwd, args.repeats, device)]
                    name = f"t{tile}_r{rows}_w{warps}"
                    out[name] = {"forward": ms[0], "backward": ms[1], "max_rel_diff": diff}
                    print(f"  {name:16} forward {ms[0]:7.3f} ms, backward {ms[1]:7.3f} ms, "
                          f"largest difference from the default's {diff:.1e}")  # fmt: skip
    finally:
        (k.ELEMENTS_PER_TILE, k.BACKWARD_ELEMENTS_PER_TILE, k.ROWS_PER_PROGRAM, k.FORWARD_WARPS,
         k.BACKWARD_WARPS) = saved  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/800m_hybrid.toml"))
    parser.add_argument("--batch", type=int, default=8, help="sequences (default 8)")
    parser.add_argument("--seq", type=int, default=4096, help="tokens a sequence (default 4096)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls (median)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--sweep", action="store_true", help="ours at other tilings too")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
