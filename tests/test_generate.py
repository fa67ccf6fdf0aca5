"""Generation with states equals recomputing the whole prefix; sampling controls behave."""

import gc
import logging
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import toolkit.inference.generate as generate_module
from tests.conftest import TINY_MODEL, tiny_model_config
from toolkit.inference.generate import generate, sample_next, warm_up
from toolkit.model import HybridLM


@pytest.fixture
def model():
    return HybridLM(tiny_model_config(), vocab_size=50).eval()


def naive_greedy(model, prompt, n):
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            logits = model(seq)[:, -1, : model.vocab_size]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq


def test_greedy_with_states_equals_full_recompute(model):
    prompt = torch.randint(0, 50, (3, 9))
    assert torch.equal(generate(model, prompt, 20), naive_greedy(model, prompt, 20))


def test_same_seed_same_text_other_seed_other_text(model):
    prompt = torch.randint(0, 50, (2, 5))
    a = generate(model, prompt, 30, temperature=1.0, seed=3)
    b = generate(model, prompt, 30, temperature=1.0, seed=3)
    c = generate(model, prompt, 30, temperature=1.0, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_never_samples_vocabulary_padding(model):
    assert model.padded_vocab_size > model.vocab_size
    with torch.no_grad():
        model.output_layer.weight[model.vocab_size :] = 100.0  # padding would win every draw
    out = generate(model, torch.zeros(4, 3, dtype=torch.long), 20, temperature=1.0, seed=0)
    assert out.max() < model.vocab_size


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    top2 = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, ...: top_p 0.8 keeps the first two
    nucleus = sample_next(logits, temperature=1.0, top_p=0.8, generator=g)
    assert set(nucleus.tolist()) == {0, 1} and probs[0] < 0.8 < probs[:2].sum()
    full = sample_next(logits, temperature=1.0, generator=g)
    assert len(set(full.tolist())) >= 5
    assert torch.equal(sample_next(logits[:3], top_k=1, temperature=5.0), torch.zeros(3).long())


class AlwaysToken(torch.nn.Module):
    def __init__(self, vocab: int, token: int) -> None:
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, x):
        logits = torch.zeros(*x.shape[:-1], self.vocab)
        logits[..., self.token] = 1.0
        return logits


def test_stops_when_every_row_emitted_end_of_document(model):
    model.output_layer = AlwaysToken(model.padded_vocab_size, 7)
    out = generate(model, torch.randint(0, 50, (2, 4)), 50, eod_id=7)
    assert out.shape == (2, 5) and torch.all(out[:, -1] == 7)
    assert generate(model, torch.randint(0, 50, (2, 4)), 50).shape == (2, 54)
    assert generate(model, torch.randint(0, 50, (2, 4)), 0).shape == (2, 4)


class EndsAt(torch.nn.Module):
    """An output layer that makes row r emit token 1 until its new token ends[r] (an index, None:
    never), then end of document (7); prompt tokens, fed a step at a time, count as calls."""

    def __init__(self, vocab: int, prompt_length: int, ends: list[int | None]) -> None:
        super().__init__()
        self.vocab, self.calls, self.prompt_length, self.ends = vocab, 0, prompt_length, ends

    def forward(self, x):
        index = self.calls - (self.prompt_length - 1)  # the new token these logits give
        self.calls += 1
        logits = torch.zeros(*x.shape[:-1], self.vocab)
        for row, end in enumerate(self.ends):
            logits[row, ..., 7 if end is not None and index >= end else 1] = 1.0
        return logits


class HostReads(TorchFunctionMode):
    """How many times a tensor's value is read on the host (bool, item) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in ("__bool__", "item")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ends", [[2, 9], [3, None], [0, 0], [5, 29], [None, None]])
def test_end_of_document_checked_every_few_tokens_cut_as_if_at_each(model, ends):
    """The loop reads whether every row has ended once every DONE_CHECK_EVERY tokens, not at
    each (a host sync a token on a GPU); the output is cut after the token that ended the last
    row, as a check at every token would: rows ending at new tokens 2 and 9 give 10 new tokens,
    the ended row padded with end of document; a row that never ends gives all 30."""
    model.output_layer = EndsAt(model.padded_vocab_size, 4, ends)
    with HostReads() as reads:
        out = generate(model, torch.randint(8, 50, (2, 4)), 30, eod_id=7)
    assert reads.count <= 30 // generate_module.DONE_CHECK_EVERY + 1
    last = 29 if None in ends else max(ends)
    expected = torch.ones(2, last + 1, dtype=torch.long)
    for row, end in enumerate(ends):
        if end is not None:
            expected[row, end:] = 7
    assert torch.equal(out[:, 4:], expected)


class Shapes(TorchDispatchMode):
    """Every distinct (operator, input shapes) the model and sampling run while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = tree_leaves((args, kwargs))
        shapes = tuple(tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor))
        self.seen.add((str(func), shapes))
        return func(*args, **(kwargs or {}))


# A short prompt fed through the decode step, 200 tokens; a long one prefilled at once.
@pytest.mark.parametrize("prompt_length, tokens", [(5, 200), (40, 60)])
def test_decode_shapes_do_not_change_from_token_to_token(model, prompt_length, tokens):
    """The shapes a generation runs at do not grow with the tokens it generates: on a GPU each
    new shape is a new CUDA graph to record (and, for Triton kernels, to compile), so 200 tokens
    must run at as few shapes as 10. (Before: attention over a cache one position longer each
    token, a new shape every token.)"""
    prompt = torch.randint(0, 50, (1, prompt_length))
    generate(model, prompt, 2)  # what a first call computes once per process (decode_A)
    counts = []
    for n in (10, tokens):
        with Shapes() as shapes:
            generate(model, prompt, n, temperature=1.0, seed=0)
        counts.append(len(shapes.seen))
    assert counts[0] == counts[1]


def test_long_prompt_prefill_and_short_prompt_steps_agree(model):
    """A prompt fed through the decode step a token at a time continues as the same prompt
    prefilled at once (both greedy, float64)."""
    model = model.double()
    prompt = torch.randint(0, 50, (3, 12))
    stepped = generate(model, prompt, 16)
    prefilled = generate(model, prompt, 16, step_prefill=0)
    assert torch.equal(stepped, prefilled)
    assert torch.equal(stepped, naive_greedy(model, prompt, 16))


class Graded(torch.nn.Module):
    """An output layer giving every row the logits 4, 3, 2, ... over the first tokens."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        logits = torch.full((*x.shape[:-1], self.vocab), -100.0, device=x.device)
        logits[..., :6] = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0], device=x.device)
        return logits


def test_sampling_settings_reach_the_device_once_per_generation(model, monkeypatch):
    """generate builds the rows' sampling settings once (sampling.Rows.build reads them on the
    host and copies them over), not at every token, and samples with them: top-k 2 keeps
    tokens 0 and 1, a temperature without it reaches further."""
    model.output_layer = Graded(model.padded_vocab_size)
    builds = []
    build = generate_module.Rows.build
    monkeypatch.setattr(generate_module.Rows, "build", lambda *a: builds.append(a) or build(*a))
    prompt = torch.randint(8, 50, (4, 3))
    top2 = generate(model, prompt, 40, temperature=1.0, top_k=2, seed=0)[:, 3:]
    assert len(builds) == 1 and set(top2.flatten().tolist()) == {0, 1}
    wider = generate(model, prompt, 40, temperature=1.0, seed=0)[:, 3:]
    assert len(set(wider.flatten().tolist())) >= 4


def test_decoder_freed_when_generate_returns(model, monkeypatch):
    """generate's decode step holds no reference cycle: its decoder (and on a GPU its graphs) is
    freed as the call returns, not whenever Python's cyclic collector runs, which could be
    while a later call records its own graph (seen on an H200: the capture invalidated)."""
    decoders = []

    class Tracked(generate_module.StaticDecoder):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            decoders.append(weakref.ref(self))

    monkeypatch.setattr(generate_module, "StaticDecoder", Tracked)
    gc.collect()
    gc.disable()
    try:
        generate(model, torch.randint(0, 50, (1, 4)), 10, temperature=1.0, top_k=5, seed=0)
        assert len(decoders) == 1 and decoders[0]() is None
    finally:
        gc.enable()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_sampling_inside_the_recorded_step_as_eagerly(model, caplog):
    """On a GPU the decode graph samples too (top-k, a temperature, end of document): the same
    tokens as the same seed decoded without graphs, short and long prompts, every graph
    recorded."""
    caplog.set_level(logging.INFO, logger="toolkit.inference.cuda_graph")
    model = model.cuda()
    for length in (4, 40):
        prompt = torch.randint(0, 50, (2, length))
        kwargs = dict(temperature=0.8, top_k=10, seed=1, eod_id=3)
        graphed = generate(model, prompt, 60, cuda_graphs=True, **kwargs)
        eager = generate(model, prompt, 60, cuda_graphs=False, **kwargs)
        assert torch.equal(graphed, eager)
    assert caplog.text.count("recorded a decode graph") == 2 and "failed" not in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_graph_records_while_garbage_holds_another(model):
    """A recorded graph left in cyclic garbage is not collected while another graph records
    (the collector's runs are off during a capture): collected then, its reset would invalidate
    the capture and the decoder would fall back to eager steps."""
    model = model.cuda()
    token = torch.zeros(1, dtype=torch.long, device="cuda")

    def decoder(forward):
        positions = torch.zeros(1, dtype=torch.long, device="cuda")
        return generate_module.StaticDecoder(
            forward, model.allocate_states(1, 64), positions, max_len=64, cuda_graphs=True
        )

    spare = [decoder(lambda tokens, views: model(tokens, views)[:, 0])]
    spare[0](token, 1)  # recorded

    def forward(tokens, views):
        if torch.cuda.is_current_stream_capturing() and spare:
            box = [spare.pop()]
            box.append(box)  # the recorded decoder now held by young cyclic garbage only
            del box
            thresholds = gc.get_threshold()
            gc.set_threshold(1)  # the collector would run at the next allocations
            try:
                [[] for _ in range(1000)]
            finally:
                gc.set_threshold(*thresholds)
        return model(tokens, views)[:, 0]

    recording = decoder(forward)
    recording(token, 1)
    assert recording.error is None and recording.graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_200_tokens_record_one_decode_graph(model, caplog):
    caplog.set_level(logging.INFO, logger="toolkit.inference.cuda_graph")
    generate(model.cuda(), torch.randint(0, 50, (1, 4)), 200, temperature=1.0, seed=0)
    assert caplog.text.count("recorded a decode graph") == 1


def test_warm_up_runs_both_paths_and_changes_nothing(model, monkeypatch):
    """warm_up (forced on the CPU) generates greedy (unless greedy=False) and with the given
    sampling settings, then leaves the model as it was: the same tokens for the same seed, the
    same parameters, its training mode back, the global random stream untouched. Unforced on
    the CPU it does nothing."""
    prompt = torch.randint(0, 50, (1, 6))
    model.train()
    params = {k: v.clone() for k, v in model.state_dict().items()}

    def outputs():
        sampled = generate(model, prompt, 24, temperature=0.7, top_k=5, seed=1)
        return sampled, generate(model, prompt, 24)

    before = outputs()
    calls = []
    real = generate_module.generate
    monkeypatch.setattr(
        generate_module, "generate", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    assert warm_up(model, prompt, temperature=0.7, top_k=5) is None and not calls  # CPU: skipped
    rng = torch.get_rng_state()
    seconds = warm_up(model, prompt, temperature=0.7, top_k=5, force=True)
    assert seconds is not None and seconds > 0
    assert [k.get("temperature", 0.0) for k in calls] == [0.0, 0.7] and calls[1]["top_k"] == 5
    calls.clear()
    warm_up(model, prompt, temperature=0.7, top_k=5, force=True, greedy=False)
    assert [k.get("temperature", 0.0) for k in calls] == [0.7]  # its own setting alone
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    after = outputs()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_generate_cli_warms_up_once_with_its_settings(tmp_path, monkeypatch, capsys, caplog):
    """python -m toolkit.inference.generate with several prompts warms the decode path after
    loading (here forced on the CPU), once, with the first prompt and the CLI's sampling
    settings alone, logs its time, and prints the same text as a run without the warm-up; with
    one prompt it does not warm up (that run is its own warm-up)."""
    from toolkit.build import build_model, save_model_checkpoint
    from toolkit.config import recipe_from_dict
    from toolkit.tokenizer import ByteTokenizer

    train = {"steps": 1, "micro_batch_size": 1, "global_batch_size": 1, "lr": 1e-3}
    recipe = recipe_from_dict({"model": TINY_MODEL, "train": train})
    torch.manual_seed(0)
    save_model_checkpoint(tmp_path, build_model(recipe, ByteTokenizer()), recipe)
    argv = ["--checkpoint", str(tmp_path), "--prompt", "ab", "--prompt", "xyz",
            "--max-new-tokens", "12", "--temperature", "0.7", "--top-k", "20", "--seed", "3"]  # fmt: skip
    assert generate_module.main(argv) == 0
    unwarmed = capsys.readouterr().out
    assert "decode path warmed" not in caplog.text  # skipped on the CPU
    calls = []

    def forced(model, prompt, tokens, **settings):
        calls.append((prompt.tolist(), tokens, settings))
        return warm_up(model, prompt, tokens, **settings, force=True)

    monkeypatch.setattr(generate_module, "warm_up", forced)
    caplog.set_level(logging.INFO, logger="toolkit.inference.generate")
    assert generate_module.main(argv) == 0
    assert capsys.readouterr().out == unwarmed
    settings = dict(temperature=0.7, top_k=20, top_p=0.0, eod_id=ByteTokenizer().eod)
    settings |= {"cuda_graphs": None, "greedy": False}
    assert calls == [([[97, 98]], 12, settings)]  # the calls' length
    assert "decode path warmed in" in caplog.text
    calls.clear()
    assert generate_module.main(argv[:4]) == 0  # one prompt
    assert not calls


@pytest.mark.long  # ~30 s of subprocesses; make test stays under 15 minutes
def test_generate_warm_benchmark_times_every_call_of_both_kinds(tmp_path):
    """benchmarks/generate_warm.py on the CPU: each kind called --calls times, first against the
    last, the closing sample and greedy both, in a fresh process and after the trainer's set-up
    (its decode warm-up forced) and a training step; --help works, bad flags exit 2 (no timing
    asserted)."""
    import json
    import subprocess
    import sys

    def bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "benchmarks/generate_warm.py", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    small = ["--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=2",
             "--set", "data.max_corpus_bytes=100000",
             "--set", "model.seq_length=64"]  # fmt: skip
    for name, flags, warmed in [
        ("fresh", ["--train-steps", "0"], False),
        ("trained", ["--train-steps", "1", "--warm-up", "on", *small], True),
    ]:
        out = tmp_path / f"{name}.json"
        run = bench("--device", "cpu", "--tokens", "4", "--calls", "2", "--json", str(out), *flags)
        assert run.returncode == 0, run.stderr
        result = json.loads(out.read_text())
        assert result["train_steps"] == (1 if warmed else 0)
        assert (result["decode_warm_s"] is not None) == warmed
        assert ("decode path warmed in" in run.stdout) == warmed
        for kind in ("closing_sample", "greedy"):
            seconds = result[kind]["seconds"]
            assert len(seconds) == 2 and all(s > 0 for s in seconds)
            assert result[kind]["first_over_tenth"] == pytest.approx(seconds[0] / seconds[1])
    helped = bench("--help", timeout=120)
    assert helped.returncode == 0 and "--train-steps" in helped.stdout
    for flags, message in [(["--calls", "1"], "--calls"),
                           (["--dtype", "float32"], "--dtype is for --train-steps 0")]:  # fmt: skip
        bad = bench(*flags, timeout=120)
        assert bad.returncode == 2 and message in bad.stderr
