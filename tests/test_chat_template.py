"""A model's own chat template (toolkit/inference/chat_template.py): rendered as transformers
renders it, kept inside Jinja's sandbox, found beside the tokenizer by the server and by the
Hugging Face import, the assistant's turn ended at its end token."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.test_engine import one_thread  # noqa: F401 (autouse fixture)
from tests.test_server import ROOT, TOKEN, Server, events, stream
from toolkit.build import build_model, save_model_checkpoint
from toolkit.config import load_recipe
from toolkit.inference import api
from toolkit.inference.chat_template import (
    SPECIALS_FILE,
    TEMPLATE_FILE,
    ChatTemplateError,
    chat_template_beside,
    load_chat_template,
)
from toolkit.inference.engine import Engine
from toolkit.inference.request import Request
from toolkit.inference.template_sandbox import TemplateRefused
from toolkit.tokenizer import HFTokenizer, build_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as instruct models write it: a default system turn, roles checked, a namespace, tojson
# and loop controls, whitespace trimmed by the environment's rules.
TEMPLATE = """{{ bos_token }}
{% set ns = namespace(system=false) %}
{% for message in messages %}
  {% if message['role'] == 'system' %}{% set ns.system = true %}{% endif %}
{% endfor %}
{% if not ns.system %}
<|im_start|>system
You are helpful.<|im_end|>
{% endif %}
{% for message in messages %}
  {% if message['role'] not in ['system', 'user', 'assistant'] %}
    {{ raise_exception('unknown role: ' + message['role']) }}
  {% endif %}
  {% if loop.index0 > 40 %}{% break %}{% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{% if messages[-1]['role'] != 'user' %}
  {{ raise_exception('the conversation must end with a user message') }}
{% endif %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "  How are you?  "},
        {"role": "assistant", "content": "Très bien, merci."},
        {"role": "user", "content": 'Say "ça va" <b>'},
    ],
]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json with ChatML's special tokens, the template beside it
    (as checkpoints_tools/import_hf.py leaves them) and its special tokens' file."""
    root = tmp_path_factory.mktemp("chat")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([json.dumps(c) for c in CONVERSATIONS] * 20, trainer)
    tok.save(str(root / "tokenizer.json"))
    (root / TEMPLATE_FILE).write_text(TEMPLATE)
    specials = {"bos_token": "", "eos_token": "<|im_end|>", "end_tokens": ["<|endoftext|>"]}
    (root / SPECIALS_FILE).write_text(json.dumps(specials))
    return root


def test_renders_as_transformers_does(chat_dir):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(chat_dir / "tokenizer.json"), eos_token="<|im_end|>", bos_token=""
    )
    tokenizer = HFTokenizer(chat_dir / "tokenizer.json")
    ours = load_chat_template(chat_dir / TEMPLATE_FILE, tokenizer)
    for conversation in CONVERSATIONS:
        want = theirs.apply_chat_template(
            conversation, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True
        )
        assert ours.render(conversation) == want
        assert want.endswith("<|im_start|>assistant\n")
    assert 'Say "ça va" <b><|im_end|>' in want  # no HTML escapes, non-ASCII kept
    # The end of the assistant's turn: <|im_end|>'s and <|endoftext|>'s ids (the eos token and
    # generation_config's); special tokens encode as one id.
    assert ours.end_ids == {
        theirs.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
    }
    assert tokenizer.encode("<|im_start|>user")[0] == theirs.convert_tokens_to_ids("<|im_start|>")


def test_what_a_template_refuses_is_an_error_naming_it(chat_dir, tmp_path):
    template = load_chat_template(
        chat_dir / TEMPLATE_FILE, HFTokenizer(chat_dir / "tokenizer.json")
    )
    with pytest.raises(ChatTemplateError, match="refused the conversation: unknown role: tool"):
        template.render([{"role": "tool", "content": "x"}, {"role": "user", "content": "y"}])
    with pytest.raises(ChatTemplateError, match="must end with a user message"):
        template.render(CONVERSATIONS[1][:3])
    # What a template fails on with these messages is the same error, not a server fault.
    (tmp_path / TEMPLATE_FILE).write_text("{{ messages | length / (messages | length - 1) }}")
    failing = load_chat_template(tmp_path / TEMPLATE_FILE, build_tokenizer("byte"))
    with pytest.raises(ChatTemplateError, match="failed on the conversation: ZeroDivisionError"):
        failing.render([{"role": "user", "content": "hi"}])


def test_a_render_that_runs_too_long_is_stopped(tmp_path, monkeypatch):
    """The sandbox bounds each range, not their product, and no check inside the rendering
    process can stop one long C call: a template looping 3 x 10^8 times (~10 s unbounded here)
    and one raising 3 to the 10^8th (minutes in one call) are stopped at RENDER_SECONDS with an
    error naming the time; the next conversation renders in a fresh process."""
    import time

    import toolkit.inference.chat_template as chat_template

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.3)
    byte = build_tokenizer("byte")
    for text in (
        "{% for i in range(100000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}",
        "{% if messages | length > 1 %}{{ 3 ** (10**8 + messages | length) > 0 }}{% endif %}ok",
    ):
        (tmp_path / TEMPLATE_FILE).write_text(text)
        template = load_chat_template(tmp_path / TEMPLATE_FILE, byte)
        start = time.monotonic()
        with pytest.raises(ChatTemplateError, match=r"ran past 0.3 s on the conversation"):
            template.render(CONVERSATIONS[1])
        assert time.monotonic() - start < 3
    assert template.render(CONVERSATIONS[0]) == "ok"
    # Jinja folds constant expressions as it compiles: that too runs in the bounded process.
    (tmp_path / TEMPLATE_FILE).write_text("{{ 3 ** (10**8) > 0 }}")
    with pytest.raises(ChatTemplateError, match=r"did not compile: ran past 0.3 s"):
        load_chat_template(tmp_path / TEMPLATE_FILE, byte)


def test_a_render_is_bounded_in_memory(tmp_path):
    """One expression asking for 10 GB stops at RENDER_MEMORY_BYTES in the render's own
    process (the address space there is capped), at once, with an error naming the bound;
    the same process renders the next conversation, and a render just under the bound works."""
    import time

    from toolkit.inference.chat_template import RENDER_MEMORY_BYTES

    text = (
        "{{ ('a' * (messages | length * (10**10 if messages | length > 1 else 10**8))) | length }}"
    )
    (tmp_path / TEMPLATE_FILE).write_text(text)
    template = load_chat_template(tmp_path / TEMPLATE_FILE, build_tokenizer("byte"))
    child = template.template._child
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=rf"ran past its {RENDER_MEMORY_BYTES >> 20} MiB"):
        template.render(CONVERSATIONS[1])
    assert time.monotonic() - start < 3
    assert template.render(CONVERSATIONS[0]) == str(10**8)
    assert template.template._child is child


def test_renders_take_turns_and_survive_their_process(chat_dir, tmp_path):
    """Threads render through one process, each getting its own conversation's prompt; a
    process that ended while idle is replaced unseen; one that dies during a render fails that
    render, and the next starts a fresh one."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    template = load_chat_template(
        chat_dir / TEMPLATE_FILE, HFTokenizer(chat_dir / "tokenizer.json")
    )
    conversations = [[{"role": "user", "content": f"question {i}"}] for i in range(64)]
    with ThreadPoolExecutor(8) as pool:
        prompts = list(pool.map(template.render, conversations))
    assert all(f"question {i}<|im_end|>" in p for i, p in enumerate(prompts))
    template.template._child.kill()
    template.template._child.wait()
    assert template.render(conversations[0]) == prompts[0]
    # Ended between that check and the request (1 MiB: more than a pipe holds): still an
    # error naming the process, not a broken pipe.
    sandbox = template.template
    sandbox._child.kill()
    sandbox._child.wait()
    with pytest.raises(TemplateRefused, match="its render process ended"):
        sandbox._ask(json.dumps({"variables": {"x": "x" * (1 << 20)}}).encode() + b"\n", 5, "")
    (tmp_path / TEMPLATE_FILE).write_text(
        "{% if messages | length > 1 %}{% for i in range(100000) %}{% for j in range(3000) %}"
        "{% endfor %}{% endfor %}{% endif %}ok"
    )
    looping = load_chat_template(tmp_path / TEMPLATE_FILE, build_tokenizer("byte"))
    threading.Timer(0.3, looping.template._child.kill).start()
    with pytest.raises(ChatTemplateError, match="could not render the conversation: its render"):
        looping.render(CONVERSATIONS[1])
    assert looping.render(CONVERSATIONS[0]) == "ok"


# Templates that would reach Python's internals, the process or the values handed in (each of
# the first four ran `touch MARKER` in a plain Jinja environment), and what the sandbox makes of
# them: an error, or nothing (`attr` of an unsafe name is undefined there).
ESCAPES = {
    "{{ ''.__class__.__mro__[1].__subclasses__() }}": "refused",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}": "refused",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch MARKER') }}": (
        "refused"
    ),
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}": "refused",
    "{{ messages.append({'role': 'user'}) }}": "refused",
    "{{ messages[0].update({'role': 'x'}) }}": "refused",
    "{% set ns = namespace(_x=1) %}": "refused",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}": "refused",
    "{{ ('{0.__class__.__init__.__globals__}').format(raise_exception) }}": "refused",
    "{{ 'MARKER' | attr('__class__') }}": "",
}


@pytest.mark.parametrize("text", ESCAPES)
def test_the_sandbox_keeps_templates_from_python(text, tmp_path, monkeypatch):
    """A template is data from a file: what would reach Python's internals, the process or the
    request's own values stops with an error (or renders nothing); nothing runs (no MARKER
    file appears) and the messages handed in are unchanged."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / TEMPLATE_FILE).write_text(text)
    template = load_chat_template(tmp_path / TEMPLATE_FILE, build_tokenizer("byte"))
    messages = [{"role": "user", "content": "hi"}]
    try:
        out = template.render(messages)
    except ChatTemplateError:
        out = "refused"
    assert out == ESCAPES[text]
    assert not (tmp_path / "MARKER").exists()
    assert messages == [{"role": "user", "content": "hi"}]


def test_load_errors_name_the_file(tmp_path, chat_dir, monkeypatch):
    byte = build_tokenizer("byte")
    path = tmp_path / TEMPLATE_FILE
    path.write_text("{{ messages }}")
    with monkeypatch.context() as m:  # versions with known sandbox escapes are refused
        m.setattr("jinja2.__version__", "3.1.5")
        with pytest.raises(ChatTemplateError, match="jinja2 3.1.5 has known sandbox escapes"):
            load_chat_template(path, byte)
    path.unlink()
    with pytest.raises(ChatTemplateError, match=f"{path}: not a readable"):
        load_chat_template(path, byte)
    path.write_text("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match=f"{path}: not a Jinja template"):
        load_chat_template(path, byte)
    path.write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ChatTemplateError, match=f"{path}: not a readable text file"):
        load_chat_template(path, byte)
    path.write_text("{{ messages }}")
    (tmp_path / SPECIALS_FILE).write_text("[1]")
    with pytest.raises(ChatTemplateError, match=f"{SPECIALS_FILE}: bos_token and eos_token"):
        load_chat_template(path, byte)
    (tmp_path / SPECIALS_FILE).write_text(json.dumps({"end_tokens": "<eod>"}))
    with pytest.raises(ChatTemplateError, match="end_tokens must be a list of strings"):
        load_chat_template(path, byte)
    # An end token that is not one token of the tokenizer could never be generated.
    (tmp_path / SPECIALS_FILE).write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(ChatTemplateError, match="'<|im_end|>' is not one token"):
        load_chat_template(path, byte)
    # Without the specials' file: the tokenizer's own <bos> and <eod>, the turn ending at <eod>.
    (tmp_path / SPECIALS_FILE).unlink()
    template = load_chat_template(path, byte)
    assert template.end_ids == {byte.eod} and template.specials["eos_token"] == "<eod>"


def test_the_template_beside_a_tokenizer_file(chat_dir, tmp_path):
    assert chat_template_beside(str(chat_dir / "tokenizer.json")) == chat_dir / TEMPLATE_FILE
    assert chat_template_beside("byte") is None
    (tmp_path / "tokenizer.json").write_text((chat_dir / "tokenizer.json").read_text())
    assert chat_template_beside(str(tmp_path / "tokenizer.json")) is None


def test_a_turn_ends_at_an_end_token(chat_dir):
    """Request.stop_tokens end the text as <eod> does (finish reason 'eod'), unless the
    request generates past the end of documents (ignore_eos)."""
    recipe = load_recipe(ROOT / "recipes/tiny_hybrid.toml")
    tokenizer = build_tokenizer("byte")
    torch.manual_seed(0)
    model = build_model(recipe, tokenizer).double().eval()
    every = frozenset(range(tokenizer.vocab_size))
    engine = Engine(model, tokenizer, slots=2, max_len=64)
    ended, goes_on = (
        Request(prompt=[1, 2, 3], max_new_tokens=5, stop_tokens=every),
        Request(prompt=[1, 2, 3], max_new_tokens=5, stop_tokens=every, stop_at_eod=False),
    )
    engine.run([ended, goes_on])
    assert (len(ended.tokens), ended.finish_reason) == (1, "eod")
    assert (len(goes_on.tokens), goes_on.finish_reason) == (5, "length")


@pytest.fixture(scope="module")
def chat_checkpoint(chat_dir, tmp_path_factory) -> Path:
    recipe = load_recipe(
        ROOT / "recipes/tiny_hybrid.toml",
        ["model.hidden_size=64", f'data.tokenizer="{chat_dir / "tokenizer.json"}"'],
    )
    torch.manual_seed(0)
    model = build_model(recipe, build_tokenizer(recipe.data.tokenizer))
    return save_model_checkpoint(tmp_path_factory.mktemp("ckpt"), model, recipe)


def test_the_server_chats_in_the_models_template(chat_checkpoint, chat_dir, tmp_path):
    """A checkpoint whose tokenizer has a template beside it: /v1/chat/completions completes
    the template's prompt (the same tokens as /v1/completions of its text), stopping at
    <|im_end|>; a conversation the template refuses is a 400 naming messages; with
    --chat-template none, Megatron's template for pretrained models."""
    tokenizer = HFTokenizer(chat_dir / "tokenizer.json")
    prompt = load_chat_template(chat_dir / TEMPLATE_FILE, tokenizer).render(CONVERSATIONS[1])
    settings = {"max_tokens": 8, "temperature": 0}
    server = Server(chat_checkpoint, tmp_path / "serve.log")
    try:
        assert f"chat template: {chat_dir / TEMPLATE_FILE}" in (tmp_path / "serve.log").read_text()
        status, chat = server.call("POST", "/v1/chat/completions",
                                   settings | {"messages": CONVERSATIONS[1]})  # fmt: skip
        assert status == 200, chat
        plain = server.call("POST", "/v1/completions", settings | {"prompt": prompt})[1]
        assert chat["usage"]["prompt_tokens"] == len(tokenizer.encode(prompt))
        assert chat["usage"] == plain["usage"]
        assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
        # Streamed, the same answer in deltas.
        body = settings | {"messages": CONVERSATIONS[1]}
        chunks = [
            json.loads(e) for e in events(stream(server.port, body, "/v1/chat/completions"))[:-1]
        ]
        deltas = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert deltas == chat["choices"][0]["message"]["content"]
        status, refused = server.call("POST", "/v1/chat/completions",
                                      settings | {"messages": CONVERSATIONS[1][:3]})  # fmt: skip
        assert status == 400 and refused["error"]["param"] == "messages", refused
        assert "must end with a user message" in refused["error"]["message"]
        # The interactive client's --chat: the conversation's turns, an answer each, /reset.
        first = server.call("POST", "/v1/chat/completions",
                            settings | {"messages": CONVERSATIONS[0]})[1]  # fmt: skip
        answer = first["choices"][0]["message"]["content"]
        out = client(server, "Hi there\nAnd?\n/reset\nHi there\n", "--chat", "--top-k", "1",
                     "--tokens-to-generate", "8")  # fmt: skip
        answers = [
            line.split("Assistant: ", 1)[1] for line in out.splitlines() if "Assistant: " in line
        ]
        assert len(answers) == 3 and answers[0] == answers[2] == answer, out
        # The second turn went with the first turn's question and answer, the third alone.
        log = (tmp_path / "serve.log").read_text()
        n1, n2, n3 = [int(n) for n in re.findall(r"prompt_tokens=(\d+)", log)[-3:]]
        assert n2 > n1 + 2 and n3 == n1, (n1, n2, n3)
        assert "(a new conversation)" in out
        # A message's text is never template text.
        status, literal = server.call("POST", "/v1/chat/completions",
                                      settings | {"messages": [{"role": "user", "content": "{{ 7 * 7 }}"}]})  # fmt: skip
        assert status == 200, literal
    finally:
        server.stop()
    server = Server(chat_checkpoint, tmp_path / "none.log", "--chat-template", "none")
    try:
        chat = server.call(
            "POST", "/v1/chat/completions", settings | {"messages": CONVERSATIONS[0]}
        )
        megatron = api.chat_prompt([("user", "Hi there")])
        plain = server.call("POST", "/v1/completions", settings | {"prompt": megatron})[1]
        assert chat[1]["usage"] == plain["usage"]
    finally:
        server.stop()


def client(server: Server, text: str, *args: str) -> str:
    """launchers/generate_cli.py against `server`, `text` as its input: its output."""
    cmd = [sys.executable, str(ROOT / "launchers/generate_cli.py"), f"127.0.0.1:{server.port}"]
    done = subprocess.run([*cmd, *args], input=text, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"TOOLKIT_SERVE_TOKEN": TOKEN})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_server_refuses_a_broken_template(chat_checkpoint, tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% if %}")
    cmd = [sys.executable, str(ROOT / "launchers/serve.py"), "--checkpoint", str(chat_checkpoint),
           "--chat-template", str(broken)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and f"{broken}: not a Jinja template" in done.stderr


def test_the_client_wants_chat_for_a_system_message():
    cmd = [sys.executable, str(ROOT / "launchers/generate_cli.py"), "127.0.0.1:1", "--system", "x"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--system needs --chat" in done.stderr


def test_a_site_cap_on_memory_below_the_bound_is_kept(tmp_path):
    """Under a lower `ulimit -v` (a cluster's cap), the render's process keeps that cap rather
    than failing to raise it: the template loads and renders."""
    code = (
        "from toolkit.inference.template_sandbox import SandboxedTemplate\n"
        "t = SandboxedTemplate('{{ messages | length }} turns', 512 << 20, 5.0)\n"
        "print(t.render(messages=[1, 2]))\n"
    )
    proc = subprocess.run(
        ["bash", "-c", f'ulimit -v 400000 && exec "{sys.executable}" -c "$0"', code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "2 turns\n"


def test_renders_past_the_first_1024_file_descriptors(chat_dir, descriptors_past_1024):
    """A server holding many connections: the render's pipe may be numbered past select()'s
    1024; the render still waits on it within its time."""
    template = load_chat_template(
        chat_dir / TEMPLATE_FILE, HFTokenizer(chat_dir / "tokenizer.json")
    )
    assert template.template._child.stdout.fileno() > 1024
    assert template.render(CONVERSATIONS[0]).endswith("<|im_start|>assistant\n")
