"""The GPU training path against the CPU reference: same weights, same batch, same steps.

    source benchmarks/gpu_setup.sh && python3 benchmarks/gpu_parity.py [--json OUT] [--steps 50]

A small hybrid (every block kind; Mamba-2 shapes the mamba-ssm kernels take) is built once on the
CPU in fp32 with `model.kernels = "reference"` (the pure-PyTorch SSD) and copied to the GPU with
`model.kernels = "auto"` (mamba-ssm's fused conv + SSD + gated-norm op when causal-conv1d imports;
the JSON says which ran).

1. One forward/backward on the same batch, every fourth label IGNORE_INDEX (as data.eod_mask_loss
   leaves labels out of the loss). Relative L2 (||gpu - cpu|| / ||cpu||) of the logits and of every
   parameter's gradient, for the GPU in fp32 (kernel correctness: expect <= 1e-4) and under bf16
   autocast (how the trainer runs). Pass: under bf16, the logits and the whole gradient (all
   parameters as one vector) <= 1e-2; tensors above 1e-2 on their own are listed (small,
   token-summed ones such as dt_bias reach ~2e-2 under bf16 autocast even on the CPU).
2. `--steps` steps of the toolkit's AdamW (fused on the GPU; lr 3e-4, betas 0.9/0.95, weight
   decay 0.1 on matrices, clip 1.0) on the same batches, CPU fp32 vs GPU bf16 autocast. Pass:
   mean |loss difference| <= 0.03 nats and max <= 0.1 nats, and the loss falls by at least 1 nat
   (the batches follow a fixed bigram cycle: learnable).
Exit status 0 when everything passes, 1 otherwise.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.config import ModelConfig, TrainConfig  # noqa: E402
from toolkit.loss import IGNORE_INDEX  # noqa: E402
from toolkit.model import HybridLM  # noqa: E402
from toolkit.optim import build_optimizer  # noqa: E402
from toolkit.parallel.runtime import cross_entropy  # noqa: E402

VOCAB, SEQ, BATCH = 512, 256, 4
# The 800M's block shapes (its Triton autotuning results apply), 6 blocks, a small vocabulary.
MODEL = dict(
    num_layers=6,
    hidden_size=1024,
    seq_length=SEQ,
    pattern="M*-M-M",
    att_ratio=0.17,
    mlp_ratio=0.33,
    num_attention_heads=16,
    num_query_groups=8,
    ffn_hidden_size=4096,
    mamba_state_dim=128,
    mamba_head_dim=64,
    mamba_num_groups=8,
    mamba_chunk_size=128,
)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def batches(steps: int, seed: int = 0) -> torch.Tensor:
    """[steps, BATCH, SEQ + 1] tokens walking one fixed random cycle through 64 of the token ids
    from random starting points, one token in ten replaced by a random one: a bigram rule the
    model learns within a few dozen steps, with a loss floor well above zero."""
    g = torch.Generator().manual_seed(seed)
    cycle = torch.randperm(VOCAB, generator=g)[:64]
    starts = torch.randint(0, 64, (steps, BATCH, 1), generator=g)
    tokens = cycle[(starts + torch.arange(SEQ + 1)) % 64]
    noise = torch.rand(tokens.shape, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, tokens.shape, generator=g), tokens)


def forward_backward(model: HybridLM, tokens: torch.Tensor, autocast: bool, ignore_every: int = 0):
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
        logits = model(tokens[:, :-1])
    labels = tokens[:, 1:].clone()
    if ignore_every:
        labels[:, ::ignore_every] = IGNORE_INDEX
    loss = cross_entropy(logits, labels, model.vocab_size)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits[..., : model.vocab_size].detach().float(), grads, loss.item()


def one_step_parity(cpu: HybridLM, gpu: HybridLM) -> dict:
    tokens = batches(1, seed=123)[0]
    want_logits, want_grads, want_loss = forward_backward(cpu, tokens, False, ignore_every=4)
    out = {"loss_cpu_fp32": want_loss}
    for label, autocast in (("gpu_fp32", False), ("gpu_bf16_autocast", True)):
        logits, grads, loss = forward_backward(gpu, tokens, autocast, ignore_every=4)
        names = list(grads)
        errors = {
            "logits": rel_l2(logits, want_logits),
            "grad (all)": rel_l2(
                torch.cat([grads[n].cpu().flatten() for n in names]),
                torch.cat([want_grads[n].flatten() for n in names]),
            ),
        }
        errors |= {f"grad {n}": rel_l2(g, want_grads[n]) for n, g in grads.items()}
        worst = max(errors, key=errors.get)
        over = sorted(k for k, v in errors.items() if v > 1e-2)
        out[label] = {
            "loss": loss,
            "max_rel_l2": errors[worst],
            "worst": worst,
            "above_1e-2": over,
            "rel_l2": errors,
        }
        print(f"{label:18} loss {loss:.5f} (cpu {want_loss:.5f}) logits {errors['logits']:.2e} "
              f"gradient {errors['grad (all)']:.2e}; worst {worst} {errors[worst]:.2e}; "
              f"above 1e-2: {over}")  # fmt: skip
    bf16 = out["gpu_bf16_autocast"]["rel_l2"]
    out["pass"] = bf16["logits"] <= 1e-2 and bf16["grad (all)"] <= 1e-2
    return out


def train_curve(model: HybridLM, data: torch.Tensor, autocast: bool) -> list[float]:
    # The toolkit's AdamW as training builds it: fused on the GPU, multi-tensor on the CPU.
    opt = build_optimizer(model, TrainConfig(steps=len(data), lr=3e-4, weight_decay=0.1))
    losses = []
    for tokens in data:
        _, _, loss = forward_backward(model, tokens, autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss)
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--steps", type=int, default=50, help="training steps compared")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: gpu_parity.py compares the CUDA path with the CPU one: no CUDA device here")
        return 2
    torch.manual_seed(0)
    cpu = HybridLM(ModelConfig(**MODEL, kernels="reference"), vocab_size=VOCAB)
    gpu = HybridLM(ModelConfig(**MODEL, kernels="auto"), vocab_size=VOCAB).cuda()
    gpu.load_state_dict(cpu.state_dict())
    mixer = next(b.mixer for b in gpu.layers if b.kind == "M")
    result = {
        "model": MODEL,
        "vocab": VOCAB,
        "batch": BATCH,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "mamba_path": f"fused (mamba-ssm + {mixer.conv_backend})"
        if mixer.fused
        else mixer.ssd.__name__,
    }
    print("GPU Mamba path:", result["mamba_path"])
    result["one_step"] = one_step_parity(cpu, gpu)

    data = batches(args.steps)
    start = time.perf_counter()
    cpu_curve = train_curve(copy.deepcopy(cpu), data, autocast=False)
    cpu_s = time.perf_counter() - start
    start = time.perf_counter()
    gpu_curve = train_curve(copy.deepcopy(gpu), data, autocast=True)
    gpu_s = time.perf_counter() - start
    diffs = [abs(a - b) for a, b in zip(cpu_curve, gpu_curve)]
    curve = {
        "steps": args.steps,
        "loss_cpu_fp32": cpu_curve,
        "loss_gpu_bf16": gpu_curve,
        "mean_abs_diff": sum(diffs) / len(diffs),
        "max_abs_diff": max(diffs),
        "seconds_cpu": cpu_s,
        "seconds_gpu": gpu_s,
        "tolerance": "mean |diff| <= 0.03 nats, max <= 0.1 nats, loss falls >= 1 nat",
    }
    curve["pass"] = (
        curve["mean_abs_diff"] <= 0.03
        and curve["max_abs_diff"] <= 0.1
        and cpu_curve[0] - cpu_curve[-1] >= 1.0
    )
    result["training"] = curve
    for s in sorted({0, 9, 19, 29, 39, args.steps - 1} & set(range(args.steps))):
        print(f"step {s + 1:3d}: cpu fp32 {cpu_curve[s]:.4f}  gpu bf16 {gpu_curve[s]:.4f}")
    print(
        f"loss curves: mean |diff| {curve['mean_abs_diff']:.4f}, max {curve['max_abs_diff']:.4f}"
        f" -> {'pass' if curve['pass'] else 'FAIL'}; one step -> "
        f"{'pass' if result['one_step']['pass'] else 'FAIL'}"
    )
    result["pass"] = curve["pass"] and result["one_step"]["pass"]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
