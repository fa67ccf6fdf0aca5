"""Generation: prefill the prompt once, then decode one token per step from the carried states
(Mamba conv/SSM state, attention KV cache); the prefix is never recomputed.

Decode steps run at static shapes, as the server's (toolkit/inference/cuda_graph.py): attention
reads a fixed span of the cache, rounded up to a bucket and masked per row, so the shapes do not
change from one token to the next (200 tokens after a short prompt: one shape), and on a CUDA
device each bucket's step is recorded once as a CUDA graph and replayed. Short prompts go
through that same step a token at a time rather than through the chunked prefill, whose GPU
kernels would be compiled and autotuned at their first call (seconds, for a few tokens). Sampling
runs inside the step (its settings on the device once, every token's random draw drawn up
front), so that a token costs the host one graph launch, and the host never waits for a token:
whether every row has ended is read a few tokens late (DoneFlag).

A process's first generation on a GPU pays once for what later ones reuse (cuBLAS handles, the
Triton kernels of mamba-ssm and our fused norms compiled or read from their cache, the first
CUDA graph capture, the sampler's kernels): seconds against ~0.2 s for 200 tokens of the tiny
model. `warm_up` pays it ahead of the call a user waits for; the CLI and the trainer (before the
sample it prints at the end) call it, `generate` itself never does.

CLI: python -m toolkit.inference.generate --checkpoint CKPT --prompt "def main(" [--temperature ...]
"""

import argparse
import logging
import sys
import time

import torch

from toolkit.inference.cuda_graph import StaticDecoder
from toolkit.inference.sampling import Rows, draw, sample
from toolkit.model import HybridLM
from toolkit.model.states import DecodeStates

log = logging.getLogger(__name__)

# Prompts of at most this many tokens are fed through the decode step (see the docstring).
STEP_PREFILL = 32
# The decode loop checks whether every row has ended every this many tokens (see DoneFlag): a
# generation whose rows all ended runs at most 2 * DONE_CHECK_EVERY - 1 steps too many, cut.
DONE_CHECK_EVERY = 4
# New tokens of a warm-up generation: the decode graph is recorded, then replayed.
WARM_UP_TOKENS = 8


class DoneFlag:
    """Whether every row has ended, copied to the host without waiting for it: the decode loop
    reads the copy made DONE_CHECK_EVERY tokens before, so that the host keeps launching steps
    ahead of the GPU instead of waiting on each token's end-of-document check (a tiny model's
    200 tokens are launch-bound: the wait at every token made them slower and uneven)."""

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None
        self.pending = False

    def copy_async(self, flag: torch.Tensor) -> None:
        self.host.copy_(flag, non_blocking=self.event is not None)
        if self.event is not None:
            self.event.record()
        self.pending = True

    def read(self) -> bool:
        """The last copy's value (False before the first)."""
        if not self.pending:
            return False
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host)


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


class Choices:
    """A generation's sampling on the device: its settings (read on the host once, not at each
    token), every new token's random draw (drawn up front), the rows that ended, and the tokens
    chosen so far, so that `choose` reads nothing on the host and a recorded decode step can
    sample too."""

    def __init__(
        self,
        model: HybridLM,
        rows: int,
        max_new_tokens: int,
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int | None,
        eod_id: int | None,
    ) -> None:
        device = model.embedding.weight.device
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        self.vocab_size, self.eod_id = model.vocab_size, eod_id
        self.rows = Rows.build([float(temperature)] * rows, [top_k] * rows,
                               [float(top_p)] * rows, model.padded_vocab_size, device)  # fmt: skip
        self.uniforms = torch.rand(max_new_tokens, rows, generator=generator, device=device)
        self.drawn = torch.zeros(1, dtype=torch.long, device=device)  # new tokens so far
        self.tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token [rows] from the logits, appended to `tokens`."""
        logits[:, self.vocab_size :] = -torch.inf  # never sample vocabulary padding
        uniform = self.uniforms.index_select(0, self.drawn).view(-1)
        token = draw(logits, self.rows, uniform)[0]
        if self.eod_id is not None:
            token = torch.where(self.done, torch.full_like(token, self.eod_id), token)
            self.done.logical_or_(token == self.eod_id)
        self.tokens.index_copy_(1, self.drawn, token[:, None])
        self.drawn.add_(1)
        return token

    def restart(self, *, ended_too: bool) -> None:
        """Forget what was chosen (a prompt token's choice is overwritten by the next one's);
        `ended_too`: and which rows ended."""
        self.drawn.zero_()
        if ended_too:
            self.done.zero_()

    def made(self, count: int) -> torch.Tensor:
        """The first `count` tokens chosen [rows, <= count], cut after the token that ended the
        last row, as a check at every token would have stopped."""
        new = self.tokens[:, :count]
        if self.eod_id is not None:
            ended = new == self.eod_id
            if bool(ended.any(dim=1).all()):
                new = new[:, : int(ended.int().argmax(dim=1).max()) + 1]
        return new


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
    cuda_graphs: bool | None = None,
    step_prefill: int = STEP_PREFILL,
) -> torch.Tensor:
    """prompt [b, l] (same length per row) -> [b, l + n] with n <= max_new_tokens new tokens.

    Rows that produced `eod_id` keep emitting it; generation stops when every row has.
    `cuda_graphs`: replay each decode step as a CUDA graph (None: on a CUDA device);
    `step_prefill`: prompts up to this many tokens are fed through the decode step.
    """
    device = model.embedding.weight.device
    prompt = prompt.to(device)
    b, length = prompt.shape
    if max_new_tokens < 1:
        return prompt
    choices = Choices(model, b, max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, eod_id=eod_id)  # fmt: skip

    def decode_and_choose(tokens: torch.Tensor, views: DecodeStates) -> torch.Tensor:
        token = choices.choose(model(tokens, views)[:, 0])
        # `tokens` is the decoder's input buffer: the next step's input, already in place. (Not
        # reached through `decoder`: a reference cycle would keep this call's graph alive until
        # Python's cyclic collector frees it, maybe while a later call records its own.)
        tokens[:, 0].copy_(token)
        return token

    max_len = length + max_new_tokens
    states = model.allocate_states(b, max_len)
    positions = torch.zeros(b, dtype=torch.long, device=device)  # read by the decode step
    decoder = StaticDecoder(
        decode_and_choose,
        states,
        positions,
        max_len=max_len,
        cuda_graphs=device.type == "cuda" if cuda_graphs is None else cuda_graphs,
        buckets=[b],
    )
    if length <= step_prefill:  # from zero states, as a prefill starts
        for p in range(length):
            choices.restart(ended_too=p == length - 1)
            decoder(prompt[:, p].contiguous(), p + 1)
            positions.add_(1)  # in place: a recorded graph reads this tensor
    else:
        decoder.tokens[:b, 0].copy_(choices.choose(model(prompt, states)[:, -1]))
        positions.fill_(length)
    all_done = DoneFlag(device)
    made = max_new_tokens
    for i in range(1, max_new_tokens):  # token i from token i - 1 at position length + i - 1
        if eod_id is not None and i % DONE_CHECK_EVERY == 0:
            if all_done.read():  # as of DONE_CHECK_EVERY tokens ago: no wait on this step
                made = i
                break
            all_done.copy_async(choices.done.all())
        decoder.launch(length + i, b)
        positions.add_(1)
    return torch.cat([prompt, choices.made(made)], dim=1)


def warm_up(
    model: HybridLM,
    prompt: torch.Tensor,
    max_new_tokens: int = WARM_UP_TOKENS,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    eod_id: int | None = None,
    cuda_graphs: bool | None = None,
    force: bool = False,
    greedy: bool = True,
) -> float | None:
    """Run the decode path once, as the `generate` calls to come will (`prompt` [b, l] with their
    batch and length: the same prefill path; their sampling settings, and greedy unless
    `greedy` is False; their `eod_id`), `max_new_tokens` each; returns the seconds it took, None
    when skipped. Give the calls' own length: on an H200 a warm-up of 8 tokens left a 200-token
    sample's first calls settling (1.36x the tenth).

    On the CPU it is skipped unless `force`d: eager CPU kernels have nothing to compile, load or
    record, so a first call costs what later ones do and a warm-up would only add its own time.
    Nothing in the model changes: no parameter is touched, it runs in eval mode (the mode is put
    back), and both runs draw from seeded generators of their own, never from the global one."""
    device = model.embedding.weight.device
    if device.type != "cuda" and not force:
        return None
    training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        # Compiled blocks (train.compile) would compile for the decode shapes: eagerly, as
        # toolkit.train.sample_text runs them.
        with torch.compiler.set_stance("force_eager"):
            # seed: even greedy draws its (unused) numbers, from a generator of its own.
            common = dict(seed=0, eod_id=eod_id, cuda_graphs=cuda_graphs)
            if greedy or temperature <= 0:
                generate(model, prompt, max_new_tokens, **common)
            if temperature > 0:
                generate(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, **common)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        model.train(training)
    return time.perf_counter() - start


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
    parser.add_argument(
        "--no-cuda-graphs", action="store_true", help="decode eagerly on GPUs (default: graphs)"
    )
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
    texts = args.prompt or ["def "]
    prompts = [
        torch.tensor([tokenizer.encode(text) or [tokenizer.eod]])  # empty: start a document
        for text in texts
    ]
    if len(prompts) > 1:
        # The first of several prompts as fast as the rest. One prompt is its own warm-up: a
        # warm-up would only add its time (on the H200, 1.9 s before a 0.3 s sample).
        seconds = warm_up(
            model,
            prompts[0],
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eod_id=tokenizer.eod,
            cuda_graphs=False if args.no_cuda_graphs else None,
            greedy=False,  # only the CLI's own setting runs
        )
        if seconds is not None:
            log.info("decode path warmed in %.1f s", seconds)
    for text, ids in zip(texts, prompts, strict=True):
        out = generate(
            model,
            ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            eod_id=tokenizer.eod,
            cuda_graphs=False if args.no_cuda_graphs else None,
        )
        print(f"--- prompt: {text!r}\n{tokenizer.decode(out[0].tolist())}\n---")
    return 0


if __name__ == "__main__":
    sys.exit(main())
