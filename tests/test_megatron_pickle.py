"""Megatron rank files are read by a restricted unpickler (DESIGN.md section 3): hostile files
run nothing (a payload would create a marker file), in the zip and the legacy torch formats and
as plain pickles; the import either succeeds (payload in a field it does not read) or exits 2
naming the file. Real-shaped args full of enums and classes from modules that do not exist
here still import, and --trust-pickle unpickles in full."""

import argparse
import collections
import enum
import os
import pickle
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.test_megatron import VOCAB, assert_same, import_cli, model_and_recipe, rank_file
from toolkit.build import model_from_checkpoint
from toolkit.checkpoint import safe_pickle
from toolkit.checkpoint.megatron import load_megatron, load_rank_file, save_megatron
from toolkit.checkpoint.safe_pickle import Placeholder

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Pickles as a call of `func` that would create `marker` when unpickled in full."""

    def __init__(self, marker: Path, func: str = "system") -> None:
        self.marker, self.func = marker, func

    def __reduce__(self):
        path = str(self.marker)
        if self.func == "system":
            return os.system, (f"touch {shlex.quote(path)}",)
        if self.func == "exec":
            return exec, (f"open({path!r}, 'w').close()",)
        if self.func == "popen":
            return subprocess.Popen, (["touch", path],)
        raise ValueError(self.func)


@pytest.fixture(scope="module")
def benign(tmp_path_factory):
    """A TP=1 PP=1 checkpoint of our own, its model, and its rank file as a dict."""
    root = tmp_path_factory.mktemp("benign")
    model, recipe = model_and_recipe("relu2")
    save_megatron(model, recipe, root, tp=1, pp=1, iteration=5)
    ckpt = torch.load(rank_file(root, 5, 0), weights_only=False)  # our own file
    return root, model, ckpt


def write(ckpt, path: Path, fmt: str, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "plain":
        with open(path, "wb") as f:
            pickle.dump(ckpt, f, protocol=protocol)
    else:
        torch.save(
            ckpt, path, _use_new_zipfile_serialization=fmt == "zip", pickle_protocol=protocol
        )


def hostile_copy(benign, root: Path, where: str, fmt: str, payload: Payload) -> Path:
    """A copy of the benign checkpoint whose rank file carries `payload` at `where`."""
    _, _, ckpt = benign
    ckpt = dict(ckpt)
    args = argparse.Namespace(**vars(ckpt["args"]))
    if where == "args":
        ckpt["args"] = payload
    elif where == "used_arg":
        args.num_attention_heads = payload
    elif where == "unused_arg":
        args.evil = payload
    elif where == "model_value":
        ckpt["model"] = ckpt["model"] | {"decoder.layers.0.mixer.D": payload}
    elif where == "model_key":
        ckpt["model"] = ckpt["model"] | {payload: torch.zeros(1)}
    elif where == "extra_key":
        ckpt["evil"] = payload
    elif where == "rng_state":
        ckpt["rng_state"] = [ckpt["rng_state"][0] | {"np_rng_state": payload}]
    elif where == "top_level":
        ckpt = payload
    if isinstance(ckpt, dict) and where != "args":
        ckpt["args"] = args
    (root / "latest_checkpointed_iteration.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "latest_checkpointed_iteration.txt").write_text("5")
    write(ckpt, rank_file(root, 5, 0), fmt)
    return rank_file(root, 5, 0)


# Where the payload sits -> whether the import can succeed (the field is not read).
WHERE = {
    "args": False,
    "used_arg": False,
    "unused_arg": True,
    "model_value": False,
    "model_key": False,
    "extra_key": True,
    "rng_state": True,
    "top_level": False,
}


@pytest.mark.parametrize("fmt", ["zip", "legacy", "plain"])
@pytest.mark.parametrize("where", list(WHERE))
def test_hostile_rank_files_run_nothing(tmp_path, capsys, benign, where, fmt):
    marker = tmp_path / "marker"
    path = hostile_copy(benign, tmp_path / "mg", where, fmt, Payload(marker))
    out = tmp_path / "ours"
    code = import_cli().main(["--in", str(tmp_path / "mg"), "--out", str(out)])
    err = capsys.readouterr().err
    assert not marker.exists(), f"the payload ran ({where}, {fmt})"
    if WHERE[where] and fmt != "plain":  # a plain pickle is not a torch file at all
        assert code == 0, err
        back, _, _ = model_from_checkpoint(out)
        assert back.vocab_size == VOCAB
        assert_same(benign[1], back)
    else:
        assert code == 2, err
        assert err.startswith("error: ") and str(path) in err and len(err.splitlines()) == 1
        assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("func", ["system", "exec", "popen"])
def test_other_payload_callables_stay_placeholders(tmp_path, benign, func):
    marker = tmp_path / "marker"
    path = hostile_copy(benign, tmp_path / "mg", "unused_arg", "zip", Payload(marker, func))
    evil = load_rank_file(path)["args"].evil
    assert not marker.exists()
    assert isinstance(evil, Placeholder) and evil.called
    want = {"system": ("posix", "system"), "exec": ("builtins", "exec")}
    assert (evil.module, evil.name) == want.get(func, ("subprocess", "Popen"))
    assert str(marker) in str(evil.args)


def test_errors_say_what_the_file_holds(tmp_path, benign):
    marker = tmp_path / "marker"
    path = hostile_copy(benign, tmp_path / "a", "model_value", "zip", Payload(marker))
    with pytest.raises(
        ValueError, match=r"'decoder.layers.0.mixer.D' holds <posix.system\(\.\.\.\)"
    ):
        load_megatron(tmp_path / "a")
    path = hostile_copy(benign, tmp_path / "b", "used_arg", "legacy", Payload(marker))
    with pytest.raises(ValueError, match=rf"{path}: args.num_attention_heads is <posix.system"):
        load_megatron(tmp_path / "b")
    path = hostile_copy(benign, tmp_path / "c", "top_level", "zip", Payload(marker))
    with pytest.raises(ValueError, match=rf"{path}: holds <posix.system\(\.\.\.\), not called>"):
        load_rank_file(path)
    path = hostile_copy(benign, tmp_path / "d", "args", "zip", Payload(marker))
    with pytest.raises(ValueError, match=rf"{path}: its args are <posix.system"):
        load_rank_file(path)
    assert not marker.exists()


def test_torchscript_archives_are_refused(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(
        ValueError, match=rf"{path}: not a readable checkpoint file \(a TorchScript"
    ):
        load_rank_file(path)


# A module that exists only while the odd rank file is written, standing for the classes of a
# real Megatron's args (enums, dataclasses, functions, numpy and torch objects).
ODD_MODULE = """
import dataclasses, enum

class AttnBackend(enum.Enum):
    flash = 1
    auto = 5

class ModelType(enum.IntEnum):
    encoder_or_decoder = 1

@dataclasses.dataclass
class Settings:
    level: int = 2
    name: str = "x"

class Slotted:
    __slots__ = ("x",)
    def __init__(self):
        self.x = 3

class WithState:
    def __getstate__(self):
        return {"k": [1, 2]}
    def __setstate__(self, state):
        raise RuntimeError("never called")

class KeywordOnly:
    def __new__(cls, *, size):
        self = super().__new__(cls)
        self.size = size
        return self
    def __getnewargs_ex__(self):
        return (), {"size": self.size}

class Items(list):
    pass

class Table(dict):
    pass

def hook():
    raise RuntimeError("never called")
"""

ODD_WRITER = """
import argparse, collections, functools, sys
import numpy as np, torch
from fakemegatron.core import enums as e
src, dst, fmt, protocol = sys.argv[1:]
ckpt = torch.load(src, weights_only=False)
args = ckpt["args"]
args.attention_backend = e.AttnBackend.flash
args.model_type = e.ModelType.encoder_or_decoder
args.settings = e.Settings()
args.slotted = e.Slotted()
args.with_state = e.WithState()
args.keyword_only = e.KeywordOnly(size=4)
args.items = e.Items([1, 2])
args.table = e.Table(a=1)
args.init_method = functools.partial(e.hook, 3)
args.hook = e.hook
args.np_scalar = np.float64(0.5)
args.np_state = np.random.RandomState(3)
args.main_grads_dtype = torch.float32
args.device = torch.device("cpu")
args.a_set = {1, 2}
args.raw = b"\\x00\\xff"
args.ordered = collections.OrderedDict(a=1)
ckpt["model"] = collections.OrderedDict(ckpt["model"])
ckpt["model"]._metadata = {"": {"version": 1}}  # as nn.Module.state_dict() holds
torch.save(ckpt, dst, _use_new_zipfile_serialization=fmt == "zip", pickle_protocol=int(protocol))
"""


@pytest.mark.parametrize("fmt,protocol", [("zip", 2), ("zip", 5), ("legacy", 2)])
def test_real_shaped_args_with_unknown_classes_import(tmp_path, capsys, benign, fmt, protocol):
    modules = tmp_path / "modules" / "fakemegatron" / "core"
    modules.mkdir(parents=True)
    for package in (modules.parent, modules):
        (package / "__init__.py").write_text("")
    (modules / "enums.py").write_text(textwrap.dedent(ODD_MODULE))
    root = tmp_path / "mg"
    (root / "iter_0000005/mp_rank_00").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("5")
    path = rank_file(root, 5, 0)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path / "modules"), str(ROOT)])}
    src = rank_file(benign[0], 5, 0)
    writer = [sys.executable, "-c", ODD_WRITER, str(src), str(path), fmt, str(protocol)]
    subprocess.run(writer, check=True, env=env, cwd=tmp_path)

    args = load_rank_file(path)["args"]
    assert "fakemegatron" not in sys.modules  # nothing was imported to read it
    backend = args.attention_backend
    assert (
        isinstance(backend, Placeholder)
        and backend.qualname == "fakemegatron.core.enums.AttnBackend"
    )
    assert backend.called and backend.args == (1,)
    assert args.model_type.args == (1,)
    assert args.settings.state == {"level": 2, "name": "x"}
    assert args.slotted.state == (None, {"x": 3}) and args.with_state.state == {"k": [1, 2]}
    assert args.items.listitems == [1, 2] and args.table.dictitems == [("a", 1)]
    if protocol >= 4:
        assert args.keyword_only.kwargs == {"size": 4}
    assert args.hook.qualname == "fakemegatron.core.enums.hook" and not args.hook.called
    assert args.np_scalar == 0.5 and args.main_grads_dtype is torch.float32
    assert args.device == torch.device("cpu") and args.a_set == {1, 2}
    assert args.raw == b"\x00\xff" and args.ordered == collections.OrderedDict(a=1)
    assert args.hidden_size == 32 and args.params_dtype is torch.float32

    out = tmp_path / "ours"
    assert import_cli().main(["--in", str(root), "--out", str(out)]) == 0, capsys.readouterr()
    back, _, _ = model_from_checkpoint(out)
    assert_same(benign[1], back)


class Backend(enum.Enum):  # importable here: --trust-pickle can resolve it
    TE = 1


def test_trust_pickle_unpickles_in_full_with_a_warning(tmp_path, capsys, caplog, benign):
    _, model, ckpt = benign
    args = argparse.Namespace(**vars(ckpt["args"]), transformer_impl=Backend.TE)
    root = tmp_path / "mg"
    write(ckpt | {"args": args}, rank_file(root, 5, 0), "legacy")
    (root / "latest_checkpointed_iteration.txt").write_text("5")
    with caplog.at_level("WARNING"):
        _, restricted = load_megatron(root)
    assert isinstance(restricted.transformer_impl, Placeholder) and not caplog.records
    with caplog.at_level("WARNING"):
        _, full = load_megatron(root, trust_pickle=True)
    assert full.transformer_impl is Backend.TE
    assert "--trust-pickle" in caplog.text and str(rank_file(root, 5, 0)) in caplog.text
    argv = ["--in", str(root), "--out", str(tmp_path / "ours"), "--trust-pickle"]
    assert import_cli().main(argv) == 0, capsys.readouterr()
    assert_same(model, model_from_checkpoint(tmp_path / "ours")[0])


def test_the_unpickler_refuses_what_would_act(tmp_path):
    """Hand-written pickles that a plain unpickler would act on: setting attributes of an
    allowed class, calling an allowed non-callable, a codec lookup, the copyreg registry,
    appending to or setting items of a non-container."""
    ns = b"cargparse\nNamespace\n"
    cases = {
        ns + b"N}X\x04\x00\x00\x00evilK\x01s\x86b.": "sets the state of a type",
        b"ctorch\nUntypedStorage\nK\x10\x85R.": "calls <class 'torch.storage.UntypedStorage'>",
        b"c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.": "refused",
        b"\x80\x02\x82\x01.": "extension code",
        ns + b")\x81K\x01a.": "APPEND to a Namespace",
        ns + b")\x81K\x01K\x02s.": "SETITEM on a Namespace",
        ns + b")\x81}(X\t\x00\x00\x00__class__ctorch\nTensor\nub.": "not plain attributes",
    }
    for data, why in cases.items():
        with pytest.raises(pickle.UnpicklingError, match=why.replace("(", r"\(")):
            safe_pickle.loads(data)
    assert not hasattr(argparse.Namespace, "evil")
    # What it does load: placeholders that record, real Namespaces, OrderedDicts, sets.
    loaded = safe_pickle.loads(pickle.dumps([argparse.Namespace(a={1}), collections.Counter(b=2)]))
    assert loaded[0] == argparse.Namespace(a={1})
    assert loaded[1].qualname == "collections.Counter" and loaded[1].args == ({"b": 2},)
