"""lm-evaluation-harness on a checkpoint (toolkit.lm_eval_adapter, `toolkit.evaluate --tasks`):
local YAML tasks over JSONL files (no download) of each request type, every number checked
against a plain forward of the model or toolkit's own greedy generation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# lm-eval is an optional extra (.[eval], in .[dev]): without it these tests skip, not fail.
pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

import toolkit  # noqa: E402
from tests.test_engine import one_thread  # noqa: E402, F401 (autouse fixture)
from toolkit import evaluate  # noqa: E402
from toolkit.build import build_model, model_from_checkpoint, save_model_checkpoint  # noqa: E402
from toolkit.config import load_recipe  # noqa: E402
from toolkit.inference.generate import generate  # noqa: E402
from toolkit.lm_eval_adapter import HybridToolkitLM  # noqa: E402
from toolkit.tokenizer import build_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQ = 64  # short, so that long contexts are truncated and documents span several windows
MAX_GEN = 12
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}

MC_DOCS = [
    {"question": "What is 2 + 2?", "choices": ["3", "4", "five"], "answer": 1},
    {"question": "Which is a colour?", "choices": ["red", "dog", "seven"], "answer": 0},
    # Longer than SEQ bytes: its context loses its beginning.
    {
        "question": "A long question " + "abc " * 25 + "- yes?",
        "choices": ["yes", "no"],
        "answer": 0,
    },
]
GEN_PROMPTS = ["def f(x):", "import ", "", "x = [" + "1, " * 30]  # empty; longer than SEQ
ROLL_TEXTS = ["The quick brown fox jumps over the lazy dog. " * 4, "short"]


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No hub access, and the datasets cache in a temporary directory."""
    cache = tmp_path_factory.mktemp("hf")
    env = OFFLINE | {"HF_HOME": str(cache), "HF_DATASETS_CACHE": str(cache / "datasets")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    overrides = [
        "model.hidden_size=64",
        "model.ffn_hidden_size=128",
        f"model.seq_length={SEQ}",
        "model.mamba_chunk_size=16",
    ]
    recipe = load_recipe(ROOT / "recipes/tiny_hybrid.toml", overrides)
    torch.manual_seed(0)
    model = build_model(recipe, build_tokenizer("byte"))
    return save_model_checkpoint(tmp_path_factory.mktemp("ckpt"), model, recipe)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The checkpoint's model in float64 (greedy picks of a random model are close calls that
    batched float32 rounding could flip) and its tokenizer."""
    model, _, tokenizer = model_from_checkpoint(str(checkpoint))
    return model.double(), tokenizer


def greedy_text(model, tokenizer, prompt: str, max_new: int = MAX_GEN) -> str:
    """toolkit.inference.generate's greedy text, the prompt truncated as the adapter does."""
    ids = tokenizer.encode(prompt)[-(SEQ - max_new) :] or [tokenizer.eod]
    out = generate(model, torch.tensor([ids]), max_new, eod_id=tokenizer.eod)[0, len(ids) :]
    return tokenizer.decode([t for t in out.tolist() if t != tokenizer.eod])


def plain_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) from one full forward of the (left-truncated) sequence."""
    tokens = (context + continuation)[-(SEQ + 1) :]
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]))[0, :, : model.vocab_size].double()
    n = len(continuation)
    target = torch.tensor(tokens[-n:])
    logprobs = logits.log_softmax(-1)[-n:].gather(-1, target[:, None])
    return float(logprobs.sum()), bool((logits[-n:].argmax(-1) == target).all())


def rolling_reference(model, tokenizer, text: str) -> float:
    windows = get_rolling_token_windows(tokenizer.encode(text), tokenizer.eod, SEQ, 1)
    return sum(plain_loglikelihood(model, *make_disjoint_window(w))[0] for w in windows)


def write_task(directory: Path, name: str, rows: list[dict], **config) -> None:
    """An lm-eval YAML task (written as JSON, a subset of YAML) over a local JSONL file."""
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    local = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}}
    config = {"task": name, "test_split": "test"} | local | config
    (directory / f"{name}.yaml").write_text(json.dumps(config, indent=2))


def metric(name: str, aggregation: str = "mean", higher_is_better: bool = True) -> dict:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


def write_tasks(directory: Path, stop: str) -> None:
    """One task per request type."""
    write_task(
        directory,
        "toy_mc",
        MC_DOCS,
        output_type="multiple_choice",
        doc_to_text="Question: {{question}}\nAnswer:",
        doc_to_choice="choices",
        doc_to_target="answer",
        metric_list=[metric("acc")],
    )
    write_task(
        directory,
        "toy_gen",
        [{"prompt": p} for p in GEN_PROMPTS],
        output_type="generate_until",
        doc_to_text="{{prompt}}",
        doc_to_target="{{prompt}}",
        generation_kwargs={"until": [stop], "max_gen_toks": MAX_GEN, "do_sample": False},
        metric_list=[metric("exact_match")],
    )
    write_task(
        directory,
        "toy_roll",
        [{"text": t} for t in ROLL_TEXTS],
        output_type="loglikelihood_rolling",
        doc_to_text="",
        doc_to_target="{{text}}",
        metric_list=[metric("byte_perplexity", "weighted_perplexity", higher_is_better=False)],
    )


def pick_stop(texts: list[str]) -> str:
    """A printable ASCII character from inside a reference generation: the stop string that is
    sure to cut at least one of them."""
    for text in texts:
        for ch in text[2:]:
            if ch.isascii() and ch.isprintable() and ch not in "{}":
                return ch
    raise AssertionError(f"no usable stop character in {texts}")


@pytest.mark.long  # make test-long: make test keeps within 15 minutes
def test_cli_scores_multiple_choice_generation_and_perplexity(checkpoint, reference, tmp_path):
    model, tokenizer = reference
    free = [greedy_text(model, tokenizer, p) for p in GEN_PROMPTS]
    stop = pick_stop(free)
    write_tasks(tmp_path, stop)
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "toolkit.evaluate", "--checkpoint", str(checkpoint)]
    cmd += ["--tasks", "toy_mc,toy_gen,toy_roll", "--include-path", str(tmp_path)]
    cmd += ["--output", str(out), "--log-samples", "--batch-size", "2"]
    cmd += ["--device", "cpu", "--dtype", "float64"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "toy_mc" in proc.stdout and "acc" in proc.stdout and "byte_perplexity" in proc.stdout
    results = json.loads(out.read_text())
    samples = results["samples"]

    # Multiple choice: each choice's log-likelihood equals the plain forward; acc follows.
    correct = []
    for sample in samples["toy_mc"]:
        scores = []
        for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
            context_ids = tokenizer.encode(context)
            expected = plain_loglikelihood(
                model, context_ids, tokenizer.encode(context + continuation)[len(context_ids) :]
            )
            assert response[0][0] == pytest.approx(expected[0], abs=1e-9)
            assert response[0][1] == expected[1]
            scores.append(expected[0])
        correct.append(scores.index(max(scores)) == sample["doc"]["answer"])
    assert results["results"]["toy_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))

    # Generation: toolkit's greedy text, cut before the stop string (at least one is cut).
    generated = {s["doc"]["prompt"]: s["resps"][0][0] for s in samples["toy_gen"]}
    expected = [text.split(stop)[0] for text in free]
    assert [generated[p] for p in GEN_PROMPTS] == expected
    assert any(e != f for e, f in zip(expected, free))

    # Perplexity: the document log-likelihood over rolling windows. ssd_chunked scans a sequence
    # shorter than a chunk as one chunk of its own length, so the evaluation's sums and the
    # reference's group differently: float64 rounding, 5e-10 of the whole sum here.
    rolled = {s["doc"]["text"]: s["resps"][0][0] for s in samples["toy_roll"]}
    for text in ROLL_TEXTS:
        want = rolling_reference(model, tokenizer, text)
        assert rolled[text] == pytest.approx(want, rel=1e-8, abs=1e-9)
    assert len(tokenizer.encode(ROLL_TEXTS[0])) > 2 * SEQ  # three windows


@pytest.fixture(scope="module")
def lm(checkpoint) -> HybridToolkitLM:
    return HybridToolkitLM(str(checkpoint), batch_size=3, device="cpu")  # float32


def requests(kind: str, *args: tuple) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_equals_the_plain_forward_in_float32(lm):
    model, tokenizer = lm.model, lm.tokenizer
    assert next(model.parameters()).dtype == torch.float32
    pairs = [(q, " " + c) for d in MC_DOCS for q in [d["question"]] for c in d["choices"]]
    pairs += [("", "starts a document"), ("trailing space ", "moves"), ("x" * 200, "y" * 40)]
    # A continuation that is the greedy one: the argmax after a context, if it is ASCII.
    for context in ("def", "import", "the", "x", "1", "a", "("):
        ids = tokenizer.encode(context)
        with torch.no_grad():
            best = int(model(torch.tensor([ids]))[0, -1, : model.vocab_size].argmax())
        if best < 128:
            pairs.append((context, chr(best)))
            break
    assert len(pairs) == 3 * 2 + 2 + 3 + 1, "no context with an ASCII greedy next byte"
    got = lm.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        stripped = context.rstrip(" ")  # lm-eval scores a context's trailing spaces
        continuation = context[len(stripped) :] + continuation
        ids = tokenizer.encode(stripped) or [tokenizer.eod]
        expected = plain_loglikelihood(model, ids, tokenizer.encode(continuation))
        assert logprob == pytest.approx(expected[0], abs=1e-5), (context, continuation)
        assert greedy == expected[1]
    assert got[-1][1], "the greedy continuation is reported as greedy"


def test_loglikelihood_rolling_equals_the_plain_forward_in_float32(lm):
    texts = ROLL_TEXTS + ["a" * (3 * SEQ + 5)]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", *[(t,) for t in texts]), True)
    for text, logprob in zip(texts, got, strict=True):
        expected = rolling_reference(lm.model, lm.tokenizer, text)
        assert logprob == pytest.approx(expected, rel=1e-6, abs=1e-5)
    # A document within one window is a single forward from the end-of-document token.
    ids = lm.tokenizer.encode("short")
    assert got[1] == pytest.approx(plain_loglikelihood(lm.model, [lm.tokenizer.eod], ids)[0])


def test_generate_until_stops_at_max_gen_toks_and_stop_strings(checkpoint, reference):
    model, tokenizer = reference
    lm = HybridToolkitLM(str(checkpoint), batch_size=2, device="cpu", dtype="float64")
    free = greedy_text(model, tokenizer, "def ", 20)
    stop = pick_stop([free])
    args = [("def ", {"until": [], "max_gen_toks": 20})]
    args += [("def ", {"until": [stop, "\x00\x01"], "max_gen_toks": 20})]
    args += [("def ", {"until": stop, "max_gen_toks": 3}), ("", {"max_gen_toks": 5})]
    got = lm.generate_until(requests("generate_until", *args), disable_tqdm=True)
    assert got[0] == free
    assert got[1] == free.split(stop)[0] != free
    assert got[2] == greedy_text(model, tokenizer, "def ", 3).split(stop)[0]
    assert got[3] == greedy_text(model, tokenizer, "", 5)
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        lm.generate_until(requests("generate_until", ("def ", {"max_gen_toks": SEQ})))


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_tasks_in_the_checkpoints_chat_template(checkpoint, reference, tmp_path, capsys):
    """--apply-chat-template (lm-eval's): each prompt reaches the model as the checkpoint's
    chat template renders it, a user turn after --system-instruction's system turn; the
    answer is the greedy continuation of that text up to the template's end of turn (here the
    byte of a character the free continuation holds), which the answer leaves out. Without a
    template beside the checkpoint's tokenizer the command line exits 2."""
    from toolkit.inference.chat_template import SPECIALS_FILE
    from toolkit.lm_eval_adapter import run_tasks, task_manager

    model, tokenizer = reference
    prompt = "def f(x):"
    context = f"<system>Be brief.\n<user>{prompt}\n<assistant>"
    free = greedy_text(model, tokenizer, context)
    end = pick_stop([free])
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    (tmp_path / SPECIALS_FILE).write_text(json.dumps({"eos_token": end}))
    generation = {"until": ["\x00\x01"], "max_gen_toks": MAX_GEN, "do_sample": False}
    write_task(tmp_path, "toy_chat", [{"prompt": prompt}], output_type="generate_until",
               doc_to_text="{{prompt}}", doc_to_target="{{prompt}}",
               generation_kwargs=generation, metric_list=[metric("exact_match")])  # fmt: skip
    lm = HybridToolkitLM(str(checkpoint), device="cpu", dtype="float64",
                         chat_template=str(tmp_path / "chat.jinja"))  # fmt: skip
    assert lm.chat_template(True) == CHAT_TEMPLATE
    manager = task_manager(str(tmp_path), builtin=False)  # the toy task alone: no 15 s index
    results = run_tasks(lm, ["toy_chat"], manager, log_samples=True, apply_chat_template=True,
                        system_instruction="Be brief.")  # fmt: skip
    (sample,) = results["samples"]["toy_chat"]
    assert sample["arguments"][0][0] == context
    assert sample["resps"][0][0] == free.split(end)[0] != free
    args = ["--checkpoint", str(checkpoint), "--tasks", "toy_chat", "--include-path"]
    assert evaluate.main([*args, str(tmp_path), "--apply-chat-template"]) == 2
    assert "has no chat template beside it" in capsys.readouterr().err


@pytest.mark.long  # make test-long: make test keeps within 15 minutes
def test_cli_errors(checkpoint, tmp_path, monkeypatch, capsys):
    args = ["--checkpoint", str(checkpoint), "--tasks"]
    assert evaluate.main([*args[:1], str(tmp_path / "missing"), "--tasks", "toy"]) == 2
    assert "neither a checkpoint directory" in capsys.readouterr().err
    assert evaluate.main([*args, "toy_mc", "--include-path", str(tmp_path / "none")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert evaluate.main([*args, "no_such_task_anywhere", "--include-path", str(tmp_path)]) == 2
    assert "unknown task(s): no_such_task_anywhere" in capsys.readouterr().err
    for bad in (["x", "--recipe", "r.toml"], ["x", "--batch-size", "0"]):  # checked by argparse
        with pytest.raises(SystemExit) as exit_:
            evaluate.main([*args, *bad])
        assert exit_.value.code == 2
    with pytest.raises(ValueError, match="'auto' is not supported"):  # lm-eval's own CLI passes it
        HybridToolkitLM(str(checkpoint), batch_size="auto")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "toolkit.lm_eval_adapter")
    monkeypatch.delattr(toolkit, "lm_eval_adapter")
    assert evaluate.main([*args, "toy_mc"]) == 1
    assert "pip install lm-eval" in capsys.readouterr().err
