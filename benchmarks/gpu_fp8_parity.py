"""FP8 against bf16 from the same initial weights, through each float8 engine, and checkpoints
written under one precision read under the others.

    source benchmarks/gpu_setup_te.sh && python3 benchmarks/gpu_fp8_parity.py [--steps 50] [--json OUT]

Model and data: gpu_parity.py's small hybrid (the 800M's block shapes, 6 blocks, of which blocks
1-4 go float8; vocabulary 512) and its learnable token cycle, 4 x 256 tokens a step.

1. Loss curves: `--steps` AdamW steps (lr 3e-4, clip 1.0) on the same batches from the same
   initial weights in bf16 autocast, torchao float8 (tensorwise), Transformer Engine FP8 with
   current scaling (train.fp8_recipe='tensorwise') and with delayed scaling ('delayed': TE's
   default history, and Megatron's, the most recent of 1 amax: train.fp8_amax_history=1,
   train.fp8_amax_algo='most_recent'), and with
   current scaling and the pre-norms fused into te.LayerNormLinear (train.te_fused_norm), and
   torchao's with every block and the output layer in float8 (train.fp8_layers='all'), and that
   with each weight cast once a step (train.fp8_weight_cache: the same curve expected); each
   FP8 curve's mean and max |loss - bf16 loss|. The yardstick is a second bf16 run from weights
   perturbed by 1e-4 relative (what bf16 training itself wanders by) and torchao's difference (the
   FP8 path already in use). Pass for an engine: mean |diff| <= max(2 x torchao's mean, 2 x the
   bf16 wander's mean, 0.02 nats), max |diff| <= 0.1 nats, and the loss falls by >= 1 nat.
2. Checkpoints (Transformer Engine present): the TE model after training is saved
   (save_model_checkpoint) and its Zarr store holds exactly the arrays of a bf16 model's store
   (no `_extra_state`: no FP8 scaling state); it loads as a plain model and into a torchao-converted
   model with every weight equal; a bf16 checkpoint and a torchao one load into a TE-converted
   model with every weight equal, and that model's loss under TE FP8 matches the bf16 loss of the
   same weights within the curves' tolerance.
Exit status 0 when everything that ran passes, 1 otherwise (2: no CUDA device).
"""

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_parity import BATCH, MODEL, SEQ, VOCAB, batches  # noqa: E402
from toolkit.build import build_model, model_from_checkpoint, save_model_checkpoint  # noqa: E402
from toolkit.checkpoint import RankView, restore  # noqa: E402
from toolkit.config import TE_AMAX_HISTORY, TrainConfig, recipe_from_dict  # noqa: E402
from toolkit.fp8_weight_cache import cast_weights_once  # noqa: E402
from toolkit.optim import build_optimizer  # noqa: E402
from toolkit.parallel.runtime import cross_entropy  # noqa: E402
from toolkit.precision import _te_imports, apply_fp8, autocast_context  # noqa: E402
from toolkit.tokenizer import ByteTokenizer  # noqa: E402

CUDA = torch.device("cuda")
# label: (precision, engine, fp8 recipe)
RUNS = {
    "bf16": ("bf16", None, "tensorwise"),
    "bf16_perturbed": ("bf16", None, "tensorwise"),
    "torchao_tensorwise": ("fp8", "torchao", "tensorwise"),
    "te_current": ("fp8", "transformer_engine", "tensorwise"),
    "te_delayed": ("fp8", "transformer_engine", "delayed"),
    "te_delayed_megatron": ("fp8", "transformer_engine", "delayed"),  # Megatron's amax history
    "te_current_fused_norm": ("fp8", "transformer_engine", "tensorwise"),  # train.te_fused_norm
    "torchao_tensorwise_all": ("fp8", "torchao", "tensorwise"),  # train.fp8_layers='all'
    "torchao_tensorwise_all_cache": ("fp8", "torchao", "tensorwise"),  # + train.fp8_weight_cache
}
# train.fp8_amax_history and train.fp8_amax_algo where a run sets them (else TE's defaults)
AMAX_HISTORY = {"te_delayed_megatron": (1, "most_recent")}


def make_recipe(root: Path):
    return recipe_from_dict(
        {
            "model": MODEL | {"vocab_size": VOCAB, "kernels": "auto"},
            "train": {
                "steps": 1,
                "device": "cuda",
                "micro_batch_size": BATCH,
                "global_batch_size": BATCH,
            },
            "checkpoint": {"dir": str(root)},
        }
    )


def build(
    recipe,
    state: dict,
    engine: str | None,
    fp8_recipe: str,
    fuse_norms: bool = False,
    layers: str = "inner",
    cast_once: bool = False,
):
    model = build_model(recipe, ByteTokenizer(), CUDA)
    model.load_state_dict(state)
    if engine is not None:
        engine, _ = apply_fp8(
            model, device=CUDA, engine=engine, recipe=fp8_recipe, fuse_norms=fuse_norms,
            layers=layers, cast_weights_once=cast_once,
        )  # fmt: skip
    return model, engine


def loss_of(
    model, tokens, precision, engine, fp8_recipe, amax_history=TE_AMAX_HISTORY
) -> torch.Tensor:
    tokens = tokens.to(CUDA)
    with autocast_context(precision, CUDA, engine, fp8_recipe, amax_history):
        logits = model(tokens[:, :-1])
    return cross_entropy(logits, tokens[:, 1:], model.vocab_size)


def curve(
    recipe, state, data, precision, engine, fp8_recipe, fuse_norms=False, layers="inner",
    cast_once=False, amax_history=TE_AMAX_HISTORY,
) -> tuple[list[float], object]:  # fmt: skip
    model, engine = build(recipe, state, engine, fp8_recipe, fuse_norms, layers, cast_once)
    opt = build_optimizer(model, TrainConfig(steps=len(data), lr=3e-4, weight_decay=0.1))
    losses = []
    for tokens in data:
        # train.fp8_weight_cache: the weights cast once for the step's forward and backward
        with cast_weights_once(model) if cast_once else contextlib.nullcontext():
            loss = loss_of(model, tokens, precision, engine, fp8_recipe, amax_history)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


def store_arrays(path: Path) -> list[str]:
    """Every array of a Zarr v3 store, by its path in the store."""
    out = []
    for meta in path.rglob("zarr.json"):
        if json.loads(meta.read_text()).get("node_type") == "array":
            out.append(str(meta.parent.relative_to(path)))
    return sorted(out)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of the parameters that differ (real vocabulary rows only for the vocab matrices)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if list(pa) != list(pb):
        return [f"names differ: {sorted(set(pa) ^ set(pb))}"]
    rows = a.vocab_size
    bad = []
    for n, t in pa.items():
        keep = slice(rows) if n in ("embedding.weight", "output_layer.weight") else ...
        if not torch.equal(t.detach().cpu()[keep], pb[n].detach().cpu()[keep]):
            bad.append(n)
    return bad


def checkpoints(recipe, te_model, bf16_state, tmp: Path, tolerance: float) -> dict:
    out: dict = {}
    tokens = batches(1, seed=7)[0]
    # TE-written store against a bf16-written one of the same weights
    te_path = save_model_checkpoint(tmp / "te", te_model, recipe, step=1)
    plain, _ = build(recipe, bf16_state, None, "tensorwise")
    bf16_path = save_model_checkpoint(tmp / "bf16", plain, recipe, step=1)
    te_arrays, bf16_arrays = store_arrays(te_path), store_arrays(bf16_path)
    out["te_store_arrays"] = len(te_arrays)
    out["te_store_extra"] = sorted(set(te_arrays) - set(bf16_arrays))
    out["te_store_missing"] = sorted(set(bf16_arrays) - set(te_arrays))
    out["te_store_extra_state"] = [a for a in te_arrays if "extra_state" in a]
    # TE -> plain (CPU, as serving loads it) and TE -> torchao
    loaded, _, _ = model_from_checkpoint(str(te_path))
    out["te_to_plain_differ"] = same_weights(loaded, te_model)
    ao, _ = build(recipe, bf16_state, "torchao", "tensorwise")
    restore(te_path, ao, None, RankView(ao.cfg, ao.vocab_size))
    out["te_to_torchao_differ"] = same_weights(ao, te_model)
    # bf16 -> TE and torchao -> TE
    te_new, _ = build(
        recipe, {k: v * 0 for k, v in bf16_state.items()}, "transformer_engine", "tensorwise"
    )
    restore(bf16_path, te_new, None, RankView(te_new.cfg, te_new.vocab_size))
    out["bf16_to_te_differ"] = same_weights(te_new, plain)
    ao_path = save_model_checkpoint(tmp / "torchao", ao, recipe, step=1)
    te_from_ao, _ = build(recipe, bf16_state, "transformer_engine", "tensorwise")
    restore(ao_path, te_from_ao, None, RankView(te_from_ao.cfg, te_from_ao.vocab_size))
    out["torchao_to_te_differ"] = same_weights(te_from_ao, ao)
    with torch.no_grad():
        fp8 = loss_of(te_new, tokens, "fp8", "transformer_engine", "tensorwise").item()
        ref = loss_of(plain, tokens, "bf16", None, "tensorwise").item()
    out["loss_te_fp8_vs_bf16_same_weights"] = [fp8, ref]
    out["pass"] = (
        not out["te_store_extra"]
        and not out["te_store_missing"]
        and not out["te_store_extra_state"]
        and not any(out[k] for k in ("te_to_plain_differ", "te_to_torchao_differ"))
        and not any(out[k] for k in ("bf16_to_te_differ", "torchao_to_te_differ"))
        and abs(fp8 - ref) <= tolerance
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--steps", type=int, default=50, help="training steps compared")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: gpu_fp8_parity.py needs a CUDA device (FP8 GEMMs)")
        return 2
    have_te = _te_imports()
    tmp = Path(tempfile.mkdtemp(prefix="fp8_parity_"))
    recipe = make_recipe(tmp)
    torch.manual_seed(0)
    init = {
        k: v.clone() for k, v in build_model(recipe, ByteTokenizer(), CUDA).state_dict().items()
    }
    g = torch.Generator(device="cpu").manual_seed(1)
    perturbed = {
        k: v + 1e-4 * v.abs().mean() * torch.randn(v.shape, generator=g).to(v)
        for k, v in init.items()
    }
    data = batches(args.steps)
    result: dict = {"model": MODEL, "vocab": VOCAB, "seq": SEQ, "batch": BATCH, "steps": args.steps,
                    "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}  # fmt: skip
    curves, te_model = {}, None
    for label, (precision, engine, fp8_recipe) in RUNS.items():
        if engine == "transformer_engine" and not have_te:
            print(f"{label}: skipped (transformer_engine does not import)")
            continue
        state = perturbed if label == "bf16_perturbed" else init
        fuse = label.endswith("_fused_norm")
        layers = "all" if "_all" in label else "inner"
        curves[label], model = curve(
            recipe, state, data, precision, engine, fp8_recipe, fuse, layers,
            cast_once=label.endswith("_cache"),
            amax_history=AMAX_HISTORY.get(label, TE_AMAX_HISTORY),
        )  # fmt: skip
        if label == "te_current":
            te_model = model
        print(f"{label:20} first {curves[label][0]:.4f} last {curves[label][-1]:.4f}")
    ref = curves["bf16"]
    diffs = {}
    for label, c in curves.items():
        if label == "bf16":
            continue
        d = [abs(a - b) for a, b in zip(c, ref)]
        diffs[label] = {"mean_abs_diff": sum(d) / len(d), "max_abs_diff": max(d)}
    yard = max(2 * diffs["torchao_tensorwise"]["mean_abs_diff"],
               2 * diffs["bf16_perturbed"]["mean_abs_diff"], 0.02)  # fmt: skip
    for label in ("torchao_tensorwise", "te_current", "te_delayed", "te_delayed_megatron",
                  "te_current_fused_norm", "torchao_tensorwise_all",
                  "torchao_tensorwise_all_cache"):  # fmt: skip
        if label in diffs:
            x = diffs[label]
            x["pass"] = (
                x["mean_abs_diff"] <= yard
                and x["max_abs_diff"] <= 0.1
                and curves[label][0] - curves[label][-1] >= 1.0
            )
    result |= {"curves": curves, "diffs": diffs, "tolerance_mean_abs_diff": yard}
    for label, x in diffs.items():
        print(f"{label:20} vs bf16: mean |diff| {x['mean_abs_diff']:.4f}, max "
              f"{x['max_abs_diff']:.4f}{'' if 'pass' not in x else ' pass' if x['pass'] else ' FAIL'}")  # fmt: skip
    print(f"tolerance on the mean |diff|: {yard:.4f} nats")
    pair = ("torchao_tensorwise_all", "torchao_tensorwise_all_cache")
    if set(pair) <= set(curves):  # the same casts, made once a step: the same curve
        same = max(abs(a - b) for a, b in zip(curves[pair[0]], curves[pair[1]]))
        result["weight_cache_max_abs_diff"] = same
        print(f"weights cast once a step against every time ('all'): max |diff| {same:.2e}")
    ok = all(x.get("pass", True) for x in diffs.values())
    if te_model is not None:
        result["checkpoints"] = checkpoints(recipe, te_model, init, tmp, yard * 2)
        ck = result["checkpoints"]
        print(f"checkpoints: TE store {ck['te_store_arrays']} arrays, extra {ck['te_store_extra']},"
              f" missing {ck['te_store_missing']}, _extra_state arrays "
              f"{ck['te_store_extra_state']}; TE->plain differ {ck['te_to_plain_differ']}, "
              f"TE->torchao {ck['te_to_torchao_differ']}, bf16->TE {ck['bf16_to_te_differ']}, "
              f"torchao->TE {ck['torchao_to_te_differ']}; loss TE fp8 / bf16 on the same weights "
              f"{ck['loss_te_fp8_vs_bf16_same_weights']} -> {'pass' if ck['pass'] else 'FAIL'}")  # fmt: skip
        ok = ok and ck["pass"]
    result["pass"] = ok
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
