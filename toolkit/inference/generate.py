"""Generation: prefill the prompt once, then decode one token per step from the carried states
(Mamba conv/SSM state, attention KV cache); the prefix is never recomputed.

CLI: python -m toolkit.inference.generate --checkpoint CKPT --prompt "def main(" [--temperature ...]
"""

import argparse
import logging
import sys

import torch

from toolkit.inference.sampling import sample
from toolkit.model import HybridLM


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [b, v] -> token ids [b]. temperature 0 is greedy; top_k 0 and top_p 0 (or 1) are off."""
    b, device = logits.size(0), logits.device
    return sample(
        logits,
        temperature=torch.full((b,), float(temperature), device=device),
        top_k=torch.full((b,), top_k, device=device),
        top_p=torch.full((b,), float(top_p), device=device),
        uniform=torch.rand(b, generator=generator, device=device),
    )


@torch.no_grad()
def generate(
    model: HybridLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    eod_id: int | None = None,
) -> torch.Tensor:
    """prompt [b, l] (same length per row) -> [b, l + n] with n <= max_new_tokens new tokens.

    Rows that produced `eod_id` keep emitting it; generation stops when every row has.
    """
    device = model.embedding.weight.device
    prompt = prompt.to(device)
    b, length = prompt.shape
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    states = model.allocate_states(b, length + max_new_tokens)
    logits = model(prompt, states)[:, -1]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out = [prompt]
    for i in range(max_new_tokens):
        logits[:, model.vocab_size :] = -torch.inf  # never sample vocabulary padding
        token = sample_next(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        if eod_id is not None:
            token = torch.where(done, torch.full_like(token, eod_id), token)
            done |= token == eod_id
        out.append(token[:, None])
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = model(token[:, None], states)[:, -1]
    return torch.cat(out, dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toolkit.inference.generate",
        description="Generate text from a checkpoint (root directory or one step directory).",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from toolkit.build import model_from_checkpoint
    from toolkit.checkpoint import CheckpointError

    try:
        model, _, tokenizer = model_from_checkpoint(args.checkpoint, args.device)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for text in args.prompt or ["def "]:
        ids = torch.tensor([tokenizer.encode(text) or [tokenizer.eod]])  # empty: start a document
        out = generate(
            model,
            ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            eod_id=tokenizer.eod,
        )
        print(f"--- prompt: {text!r}\n{tokenizer.decode(out[0].tolist())}\n---")
    return 0


if __name__ == "__main__":
    sys.exit(main())
