"""The Mamba-2 mixer's causal conv alone, as the fused training op runs it three times a layer:
causal-conv1d's kernels (mamba-ssm's op: the forward, the backward's recompute, the backward)
against ours in Triton (toolkit/model/conv_kernel.py, model.mamba_conv_backend = "triton"), on
xBC read in place from in_proj's output at a recipe's mixer widths. Milliseconds and TB/s over
the bytes each pass must move (forward: x read, out written; backward: x and dout read, dx
written), and the largest differences between the two.

    python3 benchmarks/conv_kernel.py [--recipe recipes/800m_hybrid.toml] [--batch 8]
        [--seq 4096] [--repeats 20] [--variants default,b64_w8] [--json OUT]
    python3 benchmarks/conv_kernel.py --best JSON  # its fastest variant, if it beat causal-conv1d's

Needs CUDA and causal-conv1d for the comparison; on a CPU only ours runs, under Triton's
interpreter when TRITON_INTERPRET=1 (a check that the script runs, no timing worth reading).
"""

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cross_entropy import timed_ms  # noqa: E402
from train_throughput import write_json  # noqa: E402

from toolkit.config import load_recipe  # noqa: E402
from toolkit.model import conv_kernel  # noqa: E402
from toolkit.model.fused_mamba import conv_backward, conv_forward  # noqa: E402
from toolkit.model.kernels import import_error  # noqa: E402


def passes(backend: str):
    """The fused op's conv forward and backward by `backend` (fused_mamba.conv_forward and
    conv_backward), the backward returning (dx, dweight, dbias) with dx written into the view
    given."""

    def backward(x, w, b, dout, dx):
        return (dx, *conv_backward(x, w, b, dout, dx, backend))

    return functools.partial(conv_forward, backend=backend), backward


def with_tiles(variant: str, fn):
    """fn with conv_kernel's tile globals set from `variant`: 'default', or e.g. 'b64_g8_w8'
    (b: rows a forward tile, g: a backward one, c: channels a tile, r: rows a backward program,
    w: warps, s: tiles in the backward's ring; t1: the kernels a row at a time, t2 the backward
    alone, with p runs of q rows and h channels a program, n stages)."""
    if variant == "default":
        return fn
    values = conv_kernel.tile_values(variant)

    def tiled(*args):
        saved = {k: getattr(conv_kernel, k) for k in values}
        for k, v in values.items():
            setattr(conv_kernel, k, v)
        try:
            return fn(*args)
        finally:
            for k, v in saved.items():
                setattr(conv_kernel, k, v)

    return tiled


def variant_list(text: str) -> list[str]:
    variants = [v for v in text.split(",") if v]
    for v in variants:
        if v != "default":
            try:
                conv_kernel.tile_values(v)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
    return variants


def best_variant(result: dict) -> str | None:
    """The variant of a run's JSON whose layer (2 forwards and a backward) was fastest, if it
    beat causal-conv1d's; else None."""
    ours = {n.removeprefix("triton_"): ms["layer"] for n, ms in result["ms"].items()
            if n.startswith("triton_")}  # fmt: skip
    best = min(ours, key=ours.get)
    reference = result["ms"].get("causal_conv1d", {}).get("layer", float("inf"))
    return best if ours[best] < reference else None


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_recipe(args.recipe).model
    d_inner = model.mamba_expand * model.hidden_size
    channels = d_inner + 2 * model.mamba_num_groups * model.mamba_state_dim
    width = d_inner + channels + model.mamba_heads  # in_proj's output row: z, xBC, dt
    k = model.mamba_conv_kernel
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = torch.randn(args.batch, args.seq, width, generator=g, device=device).to(dtype)
    x = rows[:, :, d_inner : d_inner + channels]  # in place, as the op reads it
    w = torch.randn(channels, k, generator=g, device=device) * 0.3
    b = torch.randn(channels, generator=g, device=device) * 0.1
    dout = torch.randn(args.batch, args.seq, channels, generator=g, device=device).to(dtype)
    dx = torch.empty_like(rows)[:, :, d_inner : d_inner + channels]
    gb = x.numel() * x.element_size() / 1e9
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "recipe": str(args.recipe), "shape": [args.batch, args.seq, channels, k],
              "dtype": str(dtype), "ms": {}, "tb_per_s": {}}  # fmt: skip
    ours = passes("triton")
    sides = {f"triton_{v}": tuple(with_tiles(v, f) for f in ours) for v in args.variants}
    if device.type == "cuda" and import_error("causal_conv1d.cpp_functions") is None:
        sides["causal_conv1d"] = passes("causal_conv1d")
    outputs = {}
    for name, (forward, backward) in sides.items():
        fwd = timed_ms(functools.partial(forward, x, w, b), args.repeats, device)
        bwd = timed_ms(functools.partial(backward, x, w, b, dout, dx), args.repeats, device)
        result["ms"][name] = {"forward": fwd, "backward": bwd, "layer": 2 * fwd + bwd}
        result["tb_per_s"][name] = {"forward": 2 * gb / fwd, "backward": 3 * gb / bwd}
        out = forward(x, w, b)
        dx_, dw, db = backward(x, w, b, dout, dx)
        outputs[name] = (out.float(), dx_.float().clone(), dw.float(), db.float())
        print(f"{name:14s} forward {fwd:7.3f} ms ({2 * gb / fwd:5.2f} TB/s)  backward "
              f"{bwd:7.3f} ms ({3 * gb / bwd:5.2f} TB/s)  a layer (2 forward + backward) "
              f"{2 * fwd + bwd:7.3f} ms")  # fmt: skip
    if "causal_conv1d" in outputs:
        ref = outputs["causal_conv1d"]
        result["rel_max_diff"], result["speedup_layer"] = {}, {}
        for name in sides:
            if name == "causal_conv1d":
                continue
            result["rel_max_diff"][name] = {
                n: (a - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
                for n, a, r in zip(("out", "dx", "dweight", "dbias"), outputs[name], ref)
            }
            speedup = result["ms"]["causal_conv1d"]["layer"] / result["ms"][name]["layer"]
            result["speedup_layer"][name] = speedup
            print(f"{name}: a layer {speedup:.2f}x causal-conv1d's; largest difference / "
                  f"largest value {result['rel_max_diff'][name]}")  # fmt: skip
    if args.json:
        write_json(args.json, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/800m_hybrid.toml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--variants",
        type=variant_list,
        default=["default"],
        help="our kernels' tiles, comma-separated: 'default' or e.g. b64_g8_w8 (b: rows a forward "
        "tile, g: a backward one, c: channels a tile, r: rows a backward program, w: warps, s: "
        "tiles in the backward's ring; t1: both passes a row at a time, t2 the backward alone, "
        "p runs of q rows and h channels a program, n stages: e.g. t2_p4_q64_h512)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--best",
        type=Path,
        metavar="JSON",
        help="print the fastest variant of an earlier run's JSON if it beat causal-conv1d's "
        "(for TOOLKIT_CONV_TILES), nothing otherwise; runs nothing",
    )
    args = parser.parse_args()
    if args.best:
        best = best_variant(json.loads(args.best.read_text()))
        if best is None:
            print(f"{args.best}: none of our variants beat causal-conv1d's", file=sys.stderr)
        else:
            print(best)
        return
    run(args)


if __name__ == "__main__":
    main()
