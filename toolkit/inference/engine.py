"""Continuous-batching decode engine over a fixed number of slots.

Each slot owns one row of every layer's decode state (Mamba conv/SSM state, attention KV cache),
allocated once for `slots` rows of `max_len` positions: memory never grows with the load.
Requests wait in a queue until a slot is free (never dropped). Every `step()`:
1. the running requests decode one token each, in one batch (the rows' caches hold different
   lengths; attention masks each row at its own position); they are kept in the lowest slots
   (one moves down when a slot below it frees), so the batch is the first rows, as few as the
   smallest of the decoder's batch buckets that holds them;
2. waiting requests are prefilled together (longest first, each pass as far as the shortest
   running prompt needs, rounded up to 16, 32, ... positions and the rows to a power of two:
   the prompts that end inside a pass are padded, the padding masked, and the longer ones
   continue from their states; a few passes, at a few shapes that warm-up runs) and copied
   into free slots, so they join the running batch at the next step; at most
   `max_prefill_tokens` prompt positions per step: a longer prompt is prefilled over several
   steps, a piece per step continuing from its own states (held apart from the slots, which the
   decode step runs over), and seated after its last piece, so the running requests still get a
   token at every step while it is admitted;
3. one token is sampled per row with the row's own settings and seed, and finished requests
   (end of document, stop string, length, cancelled) free their slots.
With `overlap` (on by default with CUDA graphs), the tokens a step samples go back into the
decode graph's input on the GPU and the next step is launched before the host reads them, so the
GPU does not wait for the host between steps; a request that finishes has one step computed for
it and thrown away.
"""

import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from toolkit.inference import gemv
from toolkit.inference.cuda_graph import StaticDecoder, span_bucket
from toolkit.inference.request import FinishReason, Request, check_request, finish_reason
from toolkit.inference.sampling import RowsCache, copy_to_host, pick, read_copy
from toolkit.model import HybridLM
from toolkit.model.kernels import triton_runs_on
from toolkit.model.states import DecodeStates
from toolkit.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Launched:
    """A decode step launched ahead (overlap): the requests it decodes, by slot, and its logits
    (the graph's output buffer, valid until the next launch)."""

    owners: dict[int, Request]
    logits: torch.Tensor


@dataclass
class Prefill:
    """A prompt longer than a step's prefill budget, prefilled a piece per step: `done`
    positions so far, in its own one-row states (not a slot's: the static decode step runs over
    free slots too, and would step a half-filled Mamba state), copied into a slot at the end."""

    request: Request
    states: DecodeStates
    tokens: torch.Tensor  # [1, prompt + 1] on the device (a spare column: see _prefill)
    done: int = 0


class Engine:
    def __init__(
        self,
        model: HybridLM,
        tokenizer: Tokenizer,
        *,
        slots: int = 8,
        max_len: int | None = None,
        max_prefill_tokens: int = 8192,
        prefill_chunk: int = 2048,
        cuda_graphs: bool | None = None,
        overlap: bool | None = None,
        ssm_state_dtype: torch.dtype = torch.float32,
        decode_buckets: Sequence[int] | None = None,
    ) -> None:
        """`max_prefill_tokens`: prompt positions prefilled per step, beside the running rows'
        decode; a longer prompt takes several steps (it trades the running requests' latency per
        token while it is admitted against its time to first token); `prefill_chunk`: the most
        positions of one prompt run through the model at once, which bounds the activations
        (attention scores grow with its square) for long prompts;
        `cuda_graphs`: decode at static shapes (toolkit/inference/cuda_graph.py), replayed as
        CUDA graphs on a CUDA device and run eagerly elsewhere; None: on for CUDA. Off: only the
        running rows are decoded, eagerly. `decode_buckets`: the batch sizes the static decoder
        steps at (None: powers of two, and `slots`). `overlap`: with the static decoder, launch
        each decode step ahead (see the module's docstring); the same tokens. None: on where
        the decoder replays CUDA graphs (faster at every batch: benchmarks/RESULTS.md).
        `ssm_state_dtype`: the slots' Mamba recurrent states (prefill always runs in fp32);
        bfloat16 halves the state a decode step reads and writes, as mamba-ssm's generation."""
        if max_prefill_tokens < 1 or prefill_chunk < 1:
            raise ValueError("max_prefill_tokens and prefill_chunk must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.slots = slots
        self.max_len = max_len or model.cfg.seq_length
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_chunk = prefill_chunk
        self.device = model.embedding.weight.device
        self.states = model.allocate_states(slots, self.max_len, ssm_dtype=ssm_state_dtype)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.host_positions = [0] * slots  # the same, for choosing a span without a sync
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self.decoder: StaticDecoder | None = None
        if cuda_graphs:
            self.decoder = StaticDecoder(
                lambda tokens, views: self._logits(self.model.hidden(tokens, views)[:, 0]),
                self.states,
                self.positions,
                max_len=self.max_len,
                cuda_graphs=True,
                buckets=decode_buckets,
            )
        self._rows_index: tuple[tuple[int, ...], Any] = ((), None)  # the last decode's rows
        if overlap is None:
            overlap = self.device.type == "cuda"
        self.overlap = overlap and self.decoder is not None
        self.launched: Launched | None = None  # overlap: the decode step running ahead
        # Overlap: requests updated by the last step whose on_update is still to be called, at
        # the next step right after it launches (see _notify).
        self.unsent: list[Request] = []
        self.active: dict[int, Request] = {}  # slot -> request
        self.waiting: deque[Request] = deque()
        self.next_input: dict[int, int] = {}  # slot -> sampled token not yet fed to the model
        self.admitted: list[Request] = []  # taken from the queue by the step in progress
        self.prefilling: Prefill | None = None  # a long prompt admitted over several steps
        self.rows = RowsCache()  # the decode batch's sampling settings, kept on the device
        self.steps = 0  # step() calls ever (warm-up included): requests' queued/first steps
        # Counters since warm-up (/health shows them; deltas over a load say where time goes):
        # steps, their host wall time and the part in prefill (on CPUs the forward itself; on
        # GPUs the launches and the syncs), the prefill passes through the model, and the steps
        # from add() to the first token summed over the requests that got one.
        self.stats = {"finished": 0, "cancelled": 0, "prompt_tokens": 0, "generated_tokens": 0}
        self.stats |= {"steps": 0, "step_seconds": 0.0, "prefill_seconds": 0.0}
        self.stats |= {"prefill_passes": 0, "first_tokens": 0, "first_token_steps": 0}
        # Decode steps (no prefill pass, some tokens): their tokens and the time from the end
        # of the step before to their own end (the loop between steps included), in all and by
        # live batch: the server's decode rate, beside the engine's own at the same batch.
        self.stats |= {"decode_steps": 0, "decode_seconds": 0.0, "decode_tokens": 0}
        self.decode_by_batch: dict[int, dict[str, float]] = {}
        self._last_step_end: float | None = None

    @torch.no_grad()
    def warm_up(
        self, context: int | None = None, *, requests: bool = True, prefill: bool | None = None
    ) -> int:
        """Record (CUDA) or run once the static decode step of every batch bucket at every
        attention span up to `context` positions (None: every span up to max_len, so that no
        graph is recorded while serving), before any request: a server does this before it says
        ready. Free rows only, whose states hold garbage anyway. With `prefill` (None: on CUDA
        devices), then every prefill pass shape (prefill_shapes), fresh and continuing. With
        `requests`, then a few requests through the whole path (see _warm_requests). Returns
        the decode steps of the buckets."""
        if self.active or self.waiting or self.launched is not None:
            return 0
        if prefill if prefill is not None else self.device.type == "cuda":
            self._warm_prefill()
        steps, needed = 0, 1
        while self.decoder is not None and needed <= min(context or self.max_len, self.max_len):
            for rows in self.decoder.buckets:
                self.decoder.launch(needed, rows)
                steps += 1
            needed = span_bucket(needed, self.max_len) + 1
        if self.decoder is not None:
            log.info("decode warmed up: %d steps, batch buckets %s", steps, self.decoder.buckets)
        if requests:
            self._warm_requests()
        return steps

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """(rows, positions) of every prefill pass that admission can run (_pass): rows a
        power of two up to the slots' (prompts that only score theirs, which take no slot, may
        go past it), positions a piece length, for as many prompts of the least length that
        gives that piece as one step admits (max_prefill_tokens) within max_len."""
        shapes, rows = [], 1
        while rows <= row_bucket(self.slots):
            prompts = fewest_prompts(rows)
            pieces = self._pieces().items()
            shapes += [(rows, p) for p, n in pieces if prompts * n <= self.max_prefill_tokens]
            rows *= 2
        return shapes

    def _pieces(self) -> dict[int, int]:
        """Each piece length -> the fewest real positions that give it."""
        pieces, n = {}, 1
        while n <= min(self.prefill_chunk, self.max_len):
            piece = piece_length(n, self.prefill_chunk)
            pieces[piece], n = n, piece + 1
        return pieces

    def _warm_prefill(self) -> None:
        """A fresh and a continuing pass at every prefill shape, on scratch states, padded as
        most passes are (the last row the fewest positions of its piece, the rows past the
        prompts none): kernels that specialise on shapes (Triton per class of length and
        count, cuDNN per shape) are compiled and tuned before ready."""
        least, shapes = self._pieces(), self.prefill_shapes()
        for rows, piece in shapes:
            tokens = torch.zeros(rows, 2 * piece + 1, dtype=torch.long, device=self.device)
            scratch = self.model.allocate_states(rows, 2 * piece)
            prompts = fewest_prompts(rows)
            real = [piece] * (prompts - 1) + [least[piece]] + [0] * (rows - prompts)
            for start in (0, piece):
                self._pass(tokens, scratch, rows, start, real)
        self.stats["prefill_passes"] = 0
        log.info("prefill warmed up: %d shapes, fresh and continuing", len(shapes))

    WARM_PROMPTS = (1, 17, 160)  # prompt lengths of _warm_requests

    def _warm_requests(self) -> None:
        """Prefill, sample and decode a few requests, then forget them (counters included):
        the first request's path beyond the prefill passes (_warm_prefill) and the decode
        graphs: sampling, logprobs, seating. One request greedy with logprobs, one sampled
        (temperature, top-k, top-p), one scoring its prompt."""
        new = min(2, self.max_len - 1)
        lengths = sorted({min(n, self.max_len - new) for n in self.WARM_PROMPTS})
        vocab = self.model.vocab_size
        settings = [
            {"logprobs": True, "top_logprobs": 2},
            {"temperature": 0.8, "top_k": 8, "top_p": 0.9},
            {"score_prompt": True, "logprobs": True},
        ]
        warm = [
            Request(
                prompt=[(7 * i + 1) % vocab for i in range(n)],
                max_new_tokens=new,
                seed=0,
                stop_at_eod=False,
                **s,
            )
            for n, s in zip(lengths, settings)
        ]
        for r in warm:  # not through add(): a TP leader would send them to the other ranks
            r.generator = torch.Generator().manual_seed(0)
            self.waiting.append(r)
        while self.has_work():
            self.step()
        self.stats = dict.fromkeys(self.stats, 0)
        self.decode_by_batch = {}

    def check(self, request: Request) -> None:
        """Raise ValueError if the request can never run here."""
        check_request(request, self.max_len, self.model.vocab_size)

    def add(self, request: Request) -> None:
        """Queue a request; it joins the running batch at the next step with a free slot."""
        self.check(request)
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little")
        request.generator = torch.Generator().manual_seed(seed)
        request.queued_step = self.steps
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.active or self.waiting or self.prefilling or self.unsent)

    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Add the requests and step until all are finished (for scripts, tests, benchmarks)."""
        for r in requests:
            self.add(r)
        while self.has_work():
            self.step()
        return list(requests)

    @torch.no_grad()
    def step(self) -> list[Request]:
        """One decode step for the running batch plus the prefill of newcomers; returns the
        requests that got a token or finished."""
        start = time.perf_counter()
        self.steps += 1
        passes, tokens = self.stats["prefill_passes"], self.stats["generated_tokens"]
        try:
            return self._step()
        finally:
            end = time.perf_counter()
            self.stats["steps"] += 1
            self.stats["step_seconds"] += end - start
            tokens = self.stats["generated_tokens"] - tokens
            if tokens and passes == self.stats["prefill_passes"] and self._last_step_end:
                self._count_decode(tokens, end - self._last_step_end)
            self._last_step_end = end

    def _count_decode(self, tokens: int, seconds: float) -> None:
        self.stats["decode_steps"] += 1
        self.stats["decode_seconds"] += seconds
        self.stats["decode_tokens"] += tokens
        batch = self.decode_by_batch.setdefault(tokens, dict.fromkeys(DECODE_KEYS, 0))
        batch["steps"] += 1
        batch["seconds"] += seconds
        batch["tokens"] += tokens

    def _step(self) -> list[Request]:
        if self.overlap:
            return self._step_overlapped()
        updated = self._drop_cancelled()
        self._compact()
        rows = sorted(self.active)
        requests = [self.active[s] for s in rows]
        logits = [self._decode(rows)] if rows else []
        return self._admit_and_sample(updated, logits, requests, rows)

    def _step_overlapped(self) -> list[Request]:
        """step() with the decode launched ahead: sample the step in flight on the device, feed
        its tokens to the graph's input, launch the next step, then read the tokens."""
        updated = self._drop_cancelled()
        self._compact()  # after the step in flight, on the device: it moves what that step left
        launched, self.launched = self.launched, None
        if launched is None and self.active:
            owners = dict(self.active)
            launched = Launched(owners, self._launch(sorted(owners), from_host=True))
        # The step in flight's rows (by slot at its launch) whose request still runs (not
        # finished or cancelled since), and the slots they hold now.
        slot_of = {id(r): s for s, r in self.active.items()}
        running = [] if launched is None else sorted(launched.owners.items())
        rows = [row for row, r in running if id(r) in slot_of]
        requests = [launched.owners[row] for row in rows]
        slots = [slot_of[id(r)] for r in requests]
        copy = None
        if rows:
            index = self._index(rows)
            whole = len(rows) == launched.logits.size(0)
            picked = pick(launched.logits if whole else launched.logits[index], requests, self.rows)
            # The next step's inputs, on the device.
            self.decoder.tokens[index if slots == rows else self._index(slots), 0] = picked[0]
            copy = copy_to_host(picked)
        # Every running request that has tokens to go: those sampled just now and those seated
        # by the last prefill (their first token is already in the graph's input).
        sampled = {id(r) for r in requests}
        going = {
            s: r
            for s, r in self.active.items()
            if len(r.tokens) + (id(r) in sampled) < r.max_new_tokens
        }
        if going:
            self.launched = Launched(going, self._launch(sorted(going), from_host=False))
        self._notify([])  # the last step's updates, while the device runs this one
        if copy is not None:
            self._apply(read_copy(copy), requests, slots)
            updated += requests
        return self._admit_and_sample(updated, [], [], [])

    def _launch(self, rows: list[int], *, from_host: bool) -> torch.Tensor:
        """Run the static decode step for `rows`, sorted: their inputs are their next_input from
        the host, or already in the graph's input; their positions advance. Returns the logits
        of the bucket's rows (the first slots), a buffer the next launch overwrites."""
        needed = max(self.host_positions[s] for s in rows) + 1
        if from_host:
            tokens = torch.zeros(rows[-1] + 1, dtype=torch.long)
            tokens[rows] = torch.tensor([self.next_input[s] for s in rows])
            logits = self.decoder(tokens, needed)
        else:
            logits = self.decoder.launch(needed, rows[-1] + 1)
        if len(rows) == self.slots:  # every slot runs: no scatter
            self.positions += 1  # in place: the graphs read this tensor
        else:
            self.positions[self._index(rows)] += 1
        for s in rows:
            self.host_positions[s] += 1
        return logits

    def _to_device(self, values: list) -> torch.Tensor:
        """Integers (nested lists) as a device tensor, copied from pinned memory without
        waiting: from pageable memory the copy waits for the GPU to finish what is queued, and
        the prefill's host would stop at each pass."""
        pinned = torch.tensor(values, pin_memory=self.device.type == "cuda")
        return pinned.to(self.device, non_blocking=True)

    def _index(self, rows: list[int]) -> torch.Tensor:
        """`rows` as a device tensor (_to_device), kept while the rows stay the same."""
        if self._rows_index[0] != tuple(rows):
            self._rows_index = (tuple(rows), self._to_device(rows))
        return self._rows_index[1]

    def _admit_and_sample(
        self,
        updated: list[Request],
        logits: list[torch.Tensor],
        requests: list[Request],
        rows: list[int],
    ) -> list[Request]:
        """Prefill newcomers within the step's budget (the long prompt in progress first), sample
        every row with logits, and report the updated requests."""
        start = time.perf_counter()
        budget = self.max_prefill_tokens
        if self.prefilling is not None:
            budget = self._prefill_long(budget, updated, logits, requests, rows)
        admitted = self.admitted = self._admit(budget)  # may start a long prompt: what is left
        if admitted:
            budget -= sum(len(r.prompt) for r in admitted)
            first, prefilled = self._prefill(admitted)
            updated += [r for r in admitted if r.max_new_tokens == 0]
            for r in admitted:
                if r.max_new_tokens == 0:
                    self._finish(r, "length")
            generating = [i for i, r in enumerate(admitted) if r.max_new_tokens > 0]
            logits.append(first[generating])
            requests += [admitted[i] for i in generating]
            rows += [prefilled[i] for i in generating]
        if self.prefilling is not None and self.prefilling.done == 0:  # started by _admit
            self._prefill_long(budget, updated, logits, requests, rows)
        self.stats["prefill_seconds"] += time.perf_counter() - start
        if requests:
            self._sample(logits[0] if len(logits) == 1 else torch.cat(logits), requests, rows)
            updated += requests
            if self.overlap:  # newcomers' first tokens: the graph's input for their first step
                for r, s in zip(requests, rows):
                    if self.active.get(s) is r:
                        self.decoder.tokens[s, 0] = self.next_input[s]
        self.admitted = []
        self._notify(updated)
        return updated

    def _notify(self, updated: list[Request]) -> None:
        """Call the on_update of the requests updated, and of those left unsent before. With a
        decode step launched ahead, `updated` waits for the next step's launch: a server's
        threads woken now would take the GIL while this thread prepares that launch (64
        streams against a simulated device, benchmarks/serve_host.py: steps 1.6-2x the
        device's); once it is launched they run while this thread waits for the device."""
        if self.launched is not None and updated:
            self.unsent += updated
            return
        unsent, self.unsent = self.unsent + updated, []
        for r in unsent:
            if r.on_update is not None:
                r.on_update(r)

    def fail_all(self, message: str) -> list[Request]:
        """Finish every request with an error (after an exception inside step())."""
        self.launched = None
        self._notify([])  # what the last steps gave them
        running = list(self.active.values())
        failed = running + [r for r in self.admitted if r not in running] + list(self.waiting)
        if self.prefilling is not None and self.prefilling.request not in failed:
            failed.append(self.prefilling.request)
        self.waiting.clear()
        self.admitted = []
        self.prefilling = None
        for slot in list(self.active):
            self._release(slot)
        for r in failed:
            r.error = message
            self._finish(r, "error")
            if r.on_update is not None:
                r.on_update(r)
        return failed

    def occupy(self, requests: Sequence[Request], context: int) -> None:
        """Seat requests in free slots as if each had a `context`-token prompt already prefilled
        (the states keep whatever they hold): decode benchmarks at long contexts, no prefill.
        Their next input is their prompt's last token."""
        free = [s for s in range(self.slots) if s not in self.active]
        if (
            len(requests) > len(free)
            or context + max(r.max_new_tokens for r in requests) > self.max_len
        ):
            raise ValueError("more requests than free slots, or context beyond max_len")
        for slot, r in zip(free, requests):
            r.generator = torch.Generator().manual_seed(r.seed or 0)
            self.active[slot] = r
            self.next_input[slot] = r.prompt[-1]
            self.positions[slot] = self.host_positions[slot] = context

    # The output layer apart from model.hidden: only the positions that need logits pay for it.
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.output_layer(hidden)[..., : self.model.vocab_size].float()

    def _score(self, hidden: torch.Tensor, targets: torch.Tensor) -> list[float]:
        """log p(targets[i]) after hidden[i], a block of positions at a time: a long prompt's
        logits over a large vocabulary would not fit at once."""
        out: list[float] = []
        for i in range(0, hidden.size(0), 512):
            lp = self._logits(hidden[i : i + 512]).log_softmax(-1)
            out += lp.gather(-1, targets[i : i + lp.size(0), None]).squeeze(-1).tolist()
        return out

    def _decode(self, rows: list[int]) -> torch.Tensor:
        """Feed each running slot its pending token; the batch spans slots 0..max(rows) (free slots
        inside that range compute garbage that nobody reads: views need no gather or scatter).
        The logits may be a CUDA graph's output buffer, which the next step overwrites."""
        if self.decoder is not None:  # one CUDA graph per batch and span bucket
            logits = self._launch(rows, from_host=True)
            return logits if len(rows) == logits.size(0) else logits[self._index(rows)]
        hi = rows[-1] + 1
        tokens = torch.zeros(hi, 1, dtype=torch.long)
        tokens[rows, 0] = torch.tensor([self.next_input[s] for s in rows])
        views = self.states.decode_rows(hi, self.positions)
        index = self._index(rows)
        with gemv.decode_products(triton_runs_on(self.device)):  # as the graphs' steps
            logits = self._logits(self.model.hidden(tokens.to(self.device), views)[index, 0])
        self.positions[index] += 1
        for s in rows:
            self.host_positions[s] += 1
        return logits

    def _admit(self, budget: int) -> list[Request]:
        """Waiting requests, in order, for the free slots, whose whole prompts fit in `budget`
        positions; the first that does not fit becomes the long prompt in progress (its slot
        stays free until it is seated: nothing else is admitted meanwhile)."""
        if self.prefilling is not None:
            return []
        free = self.slots - len(self.active)
        admitted: list[Request] = []
        while self.waiting and budget > 0:
            r = self.waiting[0]
            needs_slot = r.max_new_tokens > 0
            if needs_slot and free == 0:
                break
            self.waiting.popleft()
            if len(r.prompt) > budget:
                # Room for the padding of its last piece (see _pass) and a spare column.
                room = len(r.prompt) + self.prefill_chunk
                tokens = torch.zeros(1, room + 1, dtype=torch.long)
                tokens[0, : len(r.prompt)] = torch.tensor(r.prompt)
                states = self.model.allocate_states(1, room)
                tokens = tokens.to(self.device)
                self.prefilling = Prefill(r, states, tokens)
                break
            admitted.append(r)
            free -= needs_slot
            budget -= len(r.prompt)
        return admitted

    def _prefill_long(
        self,
        budget: int,
        updated: list[Request],
        logits: list[torch.Tensor],
        requests: list[Request],
        rows: list[int],
    ) -> int:
        """Up to `budget` more positions of the long prompt in progress; after its last, seat it
        and add its first logits to the step's (or finish it: nothing to generate). Returns the
        budget left."""
        p = self.prefilling
        r, length = p.request, len(p.request.prompt)
        end = min(length, p.done + budget)
        budget -= end - p.done
        while p.done < end:
            # Pieces end at multiples of prefill_chunk, as the prompt admitted in one step runs.
            stop = min(end, (p.done // self.prefill_chunk + 1) * self.prefill_chunk)
            hidden, first = self._pass(p.tokens, p.states, 1, p.done, [stop - p.done]), p.done
            if r.score_prompt:
                last = stop - p.done - (stop == length)  # the last position has no target
                r.prompt_logprobs += self._score(hidden[0, :last], p.tokens[0, p.done + 1 :])
            p.done = stop
        if p.done < length:
            return budget
        self.prefilling = None
        self.stats["prompt_tokens"] += length
        if r.max_new_tokens == 0:
            self._finish(r, "length")
            updated.append(r)
            return budget
        logits.append(self._logits(hidden[:, length - 1 - first]))  # the last piece's
        requests.append(r)
        rows += self._seat([r], p.states, [0], [length])
        return budget

    def _prefill(self, requests: list[Request]) -> tuple[torch.Tensor, list[int]]:
        """Run the prompts; returns the logits after each prompt [n, vocab] and the slots the
        generating requests now occupy (-1 for those that generate nothing).

        Longest first, the rows still running at each pass are a prefix; a pass runs as far as
        the shortest of them needs, rounded up to a piece length (_pass): those that end
        inside it are padded, the others go on. Prompts of a few to a hundred tokens take one
        or two passes, not one per distinct length."""
        n = len(requests)
        order = sorted(range(n), key=lambda i: -len(requests[i].prompt))
        lengths = [len(requests[i].prompt) for i in order]
        passes, start = [], 0  # (rows running, first position, piece length)
        while start < lengths[0]:
            m = sum(length > start for length in lengths)
            piece = piece_length(lengths[m - 1] - start, self.prefill_chunk)
            passes.append((m, start, piece))
            start += piece
        # One spare column: the target of the last position (never read as a prompt logprob).
        padded = [requests[i].prompt + [0] * (start + 1 - n) for i, n in zip(order, lengths)]
        padded += [[0] * (start + 1)] * (row_bucket(n) - n)
        tokens = self._to_device(padded)
        scratch = self.model.allocate_states(row_bucket(n), start)
        last = torch.empty(n, self.model.vocab_size, device=self.device)
        for m, start, piece in passes:
            real = [max(0, min(length - start, piece)) for length in lengths]
            hidden = self._pass(tokens, scratch, m, start, real)
            ending = [row for row in range(m) if lengths[row] <= start + piece]
            if ending:
                at = self._to_device([ending, [lengths[row] - start - 1 for row in ending]])
                last[at[0]] = self._logits(hidden[at[0], at[1]])
            for row in range(m):
                r = requests[order[row]]
                if r.score_prompt:
                    stop = real[row] - (row in ending)  # the last position has no target
                    r.prompt_logprobs += self._score(hidden[row, :stop], tokens[row, start + 1 :])

        self.stats["prompt_tokens"] += sum(lengths)
        seated = [row for row, i in enumerate(order) if requests[order[row]].max_new_tokens > 0]
        taken = self._seat([requests[order[row]] for row in seated], scratch, seated, lengths)
        slots = [-1] * n
        for row, slot in zip(seated, taken):
            slots[order[row]] = slot
        inverse = self._to_device(order).argsort()
        return last[inverse], slots

    def _pass(
        self, tokens: torch.Tensor, states: DecodeStates, m: int, start: int, real: list[int]
    ) -> torch.Tensor:
        """One prefill pass of the first `m` rows from position `start`, `real[row]` positions
        each: at a few shapes only, so that every one is compiled and tuned by warm-up (GPU
        kernels specialise on them: Triton per class of length, cuDNN per exact shape): rows
        padded to a power of two (rows past `m`, padding only), positions to piece_length.
        Padding leaves the rows' states as they were. Returns the hidden states [rows, piece]."""
        rows, piece = row_bucket(m), piece_length(max(real[:m]), self.prefill_chunk)
        real = real[:rows] + [0] * (rows - len(real[:rows]))
        if all(n == piece for n in real):
            valid = None  # nothing padded: the plain path
        else:
            valid = self._to_device(real)
        self.stats["prefill_passes"] += 1
        return self.model.hidden(
            tokens[:rows, start : start + piece], states.rows(rows, start, valid)
        )

    def _seat(
        self, requests: list[Request], prefilled: DecodeStates, rows: list[int], lengths: list[int]
    ) -> list[int]:
        """Seat prefilled requests (rows `rows` of `prefilled`, whose prompts are `lengths[row]`
        long) in the lowest free slots, all at once; returns their slots."""
        if not requests:
            return []
        free = [s for s in range(self.slots) if s not in self.active][: len(requests)]
        seated = [lengths[row] for row in rows]
        for slot, r, length in zip(free, requests, seated, strict=True):
            self.active[slot] = r
            self.host_positions[slot] = length
        slots, source, at = self._to_device([free, rows, seated])
        self.positions[slots] = at
        self.states.copy_rows(slots, prefilled, source, max(seated))
        return free

    def _sample(self, logits: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
        cache = None if self.admitted else self.rows  # newcomers: a one-off batch
        self._apply(read_copy(copy_to_host(pick(logits, requests, cache))), requests, rows)

    def _apply(self, picked: list[list | None], requests: list[Request], rows: list[int]) -> None:
        """The sampled tokens (and logprobs) reach their requests; finished ones free slots."""
        tokens, logprobs, values, ids = picked
        top = None if values is None else [list(zip(i, v)) for i, v in zip(ids, values)]
        for i, (r, slot, token) in enumerate(zip(requests, rows, tokens, strict=True)):
            if logprobs is not None and r.logprobs:  # before the token: readers go by len(tokens)
                if r.top_logprobs:
                    r.alternatives.append(top[i][: r.top_logprobs])
                r.token_logprobs.append(logprobs[i])
            r.tokens.append(token)
            self.stats["generated_tokens"] += 1
            if len(r.tokens) == 1:
                r.first_token_step = self.steps
                self.stats["first_tokens"] += 1
                self.stats["first_token_steps"] += self.steps - r.queued_step
            self.next_input[slot] = token
            reason = finish_reason(r, token, self.tokenizer)
            if reason is not None:
                self._release(slot)
                self._finish(r, reason)

    def _cancelled(self, r: Request) -> bool:
        return r.cancelled

    def _drop_cancelled(self) -> list[Request]:
        dropped = [r for r in self.waiting if self._cancelled(r)]
        self.waiting = deque(r for r in self.waiting if not self._cancelled(r))
        if self.prefilling is not None and self._cancelled(self.prefilling.request):
            dropped.append(self.prefilling.request)  # its states go, its slot was never taken
            self.prefilling = None
        for slot, r in list(self.active.items()):
            if self._cancelled(r):
                self._release(slot)
                dropped.append(r)
        for r in dropped:
            self._finish(r, "cancelled")
        return dropped

    def _compact(self) -> None:
        """Keep the running requests in the lowest slots, so that a decode step runs the
        smallest batch bucket that holds them: the highest moves into each free slot below."""
        for hole in [s for s in range(len(self.active)) if s not in self.active]:
            self._move(max(self.active), hole)

    def _move(self, src: int, dst: int) -> None:
        """The request of slot `src` to the free slot `dst`: its state rows, position, input."""
        self.states.copy_row(dst, self.states, src, self.host_positions[src])
        self.positions[dst] = self.host_positions[dst] = self.host_positions[src]
        if self.decoder is not None:  # the input of its next step, if already there (overlap)
            self.decoder.tokens[dst] = self.decoder.tokens[src]
        self.active[dst] = self.active[src]
        if src in self.next_input:
            self.next_input[dst] = self.next_input[src]
        self._release(src)

    def _release(self, slot: int) -> None:
        del self.active[slot]
        self.next_input.pop(slot, None)
        # Keeps the decode batch's attention span short (a free row attends to position 0 only).
        self.positions[slot] = self.host_positions[slot] = 0

    def _finish(self, r: Request, reason: FinishReason) -> None:
        r.finish_reason = reason
        self.stats["cancelled" if reason == "cancelled" else "finished"] += 1


DECODE_KEYS = ("steps", "seconds", "tokens")  # of each live batch's decode steps


def row_bucket(n: int) -> int:
    """The rows a prefill pass runs for `n` prompts: the next power of two."""
    return 1 << (n - 1).bit_length()


def fewest_prompts(rows: int) -> int:
    """The fewest prompts whose pass runs `rows` rows (a power of two): row_bucket's inverse."""
    return rows // 2 + 1 if rows > 1 else 1


def piece_length(n: int, chunk: int) -> int:
    """The positions a prefill pass runs for `n` real ones (at most `chunk`): the next power of
    two from 16, or `chunk` itself."""
    return min(max(16, 1 << (n - 1).bit_length()), chunk)


def memory_bytes(
    model: HybridLM, slots: int, max_len: int, ssm_dtype: torch.dtype = torch.float32
) -> int:
    """Bytes of decode state the engine allocates up front for `slots` x `max_len`."""
    meta = torch.device("meta")  # shapes only, no memory
    return model.allocate_states(slots, max_len, device=meta, ssm_dtype=ssm_dtype).nbytes
