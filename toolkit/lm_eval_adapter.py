"""lm-evaluation-harness (`lm-eval`) on a toolkit checkpoint: the model behind its `LM` interface.

- loglikelihood: the summed log-probability of each continuation and whether greedy decoding
  would produce it; requests are sorted by length (longest first) and batched, and a context
  longer than the model's seq_length keeps its last tokens.
- loglikelihood_rolling: a document's log-likelihood over windows of seq_length tokens, each
  token predicted once with as much context as fits (lm-eval's rolling windows).
- generate_until: generation through toolkit.inference.engine (greedy unless the task asks to
  sample), cut at the task's stop strings and at the end-of-document token.
- apply_chat_template (lm-eval's --apply_chat_template, `toolkit.evaluate
  --apply-chat-template`): the checkpoint's own chat template (toolkit.inference.chat_template,
  rendered in its sandbox). Where the checkpoint has a template, generation also ends at its
  end of turn, templated prompts or not, as transformers' generation stops at its eos ids.

Tokenization is the checkpoint's own (toolkit.tokenizer); the end-of-document token is the
prefix of an empty context, as it starts every document in training. `python -m
toolkit.evaluate --checkpoint C --tasks ...` is the command line; the class is also registered
with lm-eval as "hybrid-toolkit" once this module is imported.
"""

import logging
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from toolkit.build import model_from_checkpoint, resolve_device
from toolkit.inference.chat_template import ChatTemplate, chat_template_for
from toolkit.inference.engine import Engine, Request

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task names none
NO_CHAT_TEMPLATE = (
    "the checkpoint's tokenizer has no chat template beside it (checkpoints_tools/import_hf.py "
    "copies an instruct model's)"
)
SCORE_BLOCK = 1024  # positions per output-layer block: [block, vocab] fp32 logits at a time

Pair = tuple[tuple[str, str], list[int], list[int]]  # (strings, context ids, continuation ids)


@register_model("hybrid-toolkit")
class HybridToolkitLM(TemplateLM):
    def __init__(
        self,
        checkpoint: str,
        batch_size: int | str = 8,
        device: str = "auto",
        dtype: str = "auto",
        chat_template: str = "auto",
        **_: Any,  # lm-eval passes max_batch_size and the like to every model
    ) -> None:
        """`checkpoint`: a checkpoint root (its latest step) or a step directory; `dtype` auto is
        bfloat16 on a GPU, float32 otherwise (as the server); `chat_template` as the server's
        --chat-template (auto: the one beside the tokenizer's file, if any)."""
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(
                f"batch_size={batch_size!r}: give a positive number ('auto' is not supported)"
            )
        dev = resolve_device(str(device), "--device")
        model, recipe, tokenizer = model_from_checkpoint(str(checkpoint), dev)
        if dtype == "auto":
            dtype = "bfloat16" if dev.type == "cuda" else "float32"
        self.model = model.to(getattr(torch, dtype))
        self.tokenizer = tokenizer
        self.chat: ChatTemplate | None = chat_template_for(chat_template, tokenizer)
        self.name = recipe.name
        self.batch_size = int(batch_size)
        self._device = dev

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def max_length(self) -> int:
        return self.model.cfg.seq_length

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **_: Any
    ) -> list[int]:
        return self.tokenizer.encode(string)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template's source, which lm-eval records with the results ('' without one)."""
        return self.chat.text if self.chat is not None else ""

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if self.chat is None:
            raise ValueError(f"apply_chat_template: {NO_CHAT_TEMPLATE}")
        return self.chat.render(chat_history, add_generation_prompt)

    # -------------------------------------------------------------- log-likelihood
    def _loglikelihood_tokens(
        self, requests: list[Pair], disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (log p(continuation | context), is greedy)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, answer in zip(batch, self._score_batch([requests[i] for i in batch])):
                results[i] = answer
                if requests[i][0] is not None:  # rolling windows are cached per document
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _score_batch(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        """One right-padded forward (causal, so padding never reaches a real position); the output
        layer runs only where a continuation token is predicted."""
        inputs, spans = [], []
        for _, context, continuation in pairs:
            n = len(continuation)
            if n > self.max_length:
                raise ValueError(
                    f"a continuation of {n} tokens is longer than the model's "
                    f"seq_length {self.max_length}"
                )
            # Keep the last seq_length + 1 tokens; the last one is only a target.
            inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
            spans.append((len(inputs[-1]) - n, n))
        width = max(len(x) for x in inputs)
        tokens = torch.zeros(len(inputs), width, dtype=torch.long)
        for row, x in enumerate(inputs):
            tokens[row, : len(x)] = torch.tensor(x)
        hidden = self.model.hidden(tokens.to(self._device))  # no [b, l, vocab] logits
        picked = torch.cat([hidden[row, s : s + n] for row, (s, n) in enumerate(spans)])
        targets = torch.tensor([t for _, _, c in pairs for t in c], device=self._device)
        logprobs, greedy = self._score(picked, targets)
        sizes = [n for _, n in spans]
        return [
            (float(lp.sum()), bool(g.all()))
            for lp, g in zip(logprobs.split(sizes), greedy.split(sizes), strict=True)
        ]

    def _score(
        self, hidden: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position log p(target) (float64, for exact sums) and whether target is the argmax."""
        vocab = self.model.vocab_size
        logprobs, greedy = [], []
        for i in range(0, hidden.size(0), SCORE_BLOCK):
            logits = self.model.output_layer(hidden[i : i + SCORE_BLOCK])[:, :vocab]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16: in fp32
            t = targets[i : i + SCORE_BLOCK, None]
            logprobs.append(logits.log_softmax(-1).gather(-1, t).squeeze(-1).double())
            greedy.append(logits.argmax(-1) == t.squeeze(-1))
        return torch.cat(logprobs).cpu(), torch.cat(greedy).cpu()

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """Every window of every document in one sorted, batched pass; sums per document."""
        windows: list[Pair] = []
        owners: list[int] = []
        for doc, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))  # type: ignore[arg-type]
                owners.append(doc)
        totals = [0.0] * len(requests)
        for doc, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[doc] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -------------------------------------------------------------- generation
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """All requests through one engine of batch_size slots (continuous batching)."""
        eos = self.tokenizer.decode([self.eot_token_id]) or None  # byte-level: '' (dropped)
        engine = Engine(self.model, self.tokenizer, slots=self.batch_size, max_len=self.max_length)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        jobs: list[tuple[Request, list[str]]] = []
        for index, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
            until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=eos) if s]
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(
                    f"max_gen_toks={max_new} leaves no room for a prompt in the model's "
                    f"seq_length {self.max_length}"
                )
            # The prompt keeps its last tokens; an empty one starts a document.
            prompt = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.eot_token_id]
            sampled = bool(kwargs.get("do_sample"))
            request = Request(
                prompt=prompt,
                max_new_tokens=max_new,
                temperature=float(kwargs.get("temperature", 0.0)) if sampled else 0.0,
                top_k=int(kwargs.get("top_k") or 0) if sampled else 0,
                top_p=float(kwargs.get("top_p") or 0.0) if sampled else 0.0,
                seed=index,  # reproducible when a task samples
                stop=until,
                stop_tokens=self.chat.end_ids if self.chat is not None else frozenset(),
                on_update=lambda r: bar.update(1) if r.done else None,
            )
            jobs.append((request, until))
        engine.run([r for r, _ in jobs])
        bar.close()
        out = []
        for req, (request, until) in zip(requests, jobs, strict=True):
            if request.error is not None:
                raise RuntimeError(f"generation failed: {request.error}")
            ids = request.tokens
            if request.finish_reason == "eod":  # its last token ends the document or the turn
                ids = ids[:-1]
            text = self.tokenizer.decode(ids)
            for stop in until:  # the text ends before the first stop string, as in lm-eval's HF
                text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out


def task_manager(include_path: str | None = None, builtin: bool = True) -> Any:
    """lm-eval's task index: its built-in tasks (unless `builtin` is false: indexing them takes
    ~15 s) plus the YAML tasks under `include_path`."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=builtin)


def unknown_tasks(manager: Any, names: Sequence[str]) -> list[str]:
    """The names (or glob patterns) that match no task, group or tag of the index."""
    return [n for n in names if not manager.match_tasks([n])]


def run_tasks(
    lm: HybridToolkitLM,
    tasks: Sequence[str],
    manager: Any,
    *,
    num_fewshot: int | None = None,
    limit: float | None = None,
    bootstrap_iters: int = 100000,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    system_instruction: str | None = None,
) -> dict[str, Any]:
    """lm_eval.simple_evaluate on our model: results, configs, versions (and samples)."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=bootstrap_iters,
        log_samples=log_samples,
        apply_chat_template=apply_chat_template,
        system_instruction=system_instruction,
    )
    if results is None:  # non-zero ranks; we run one process
        raise RuntimeError("lm-eval returned no results")
    return dict(results)


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's markdown tables: per task, and per group when the tasks form groups."""
    table = lm_utils.make_table(results)
    if results.get("groups"):
        table += "\n" + lm_utils.make_table(results, "groups")
    return table
