"""A Jinja template rendered in a child process bounded in memory and time.

Jinja's immutable sandbox keeps a template from Python's internals and from the values handed
in, but not from the machine: one expression (`'a' * 10**10`, `3 ** (10**8)`) asks for gigabytes
or minutes inside a single C call, which no check in the rendering process can interrupt. So a
template from a file renders in a small child interpreter (this module and jinja2, nothing
else) whose address space is capped (RLIMIT_AS: a larger allocation fails there with
MemoryError) and which the parent kills once a render runs past its time; the next render
starts a fresh child. A render costs a pipe round trip (~0.1 ms); the child starts when the
template is loaded, so the first render is as quick as the next.

Protocol: one JSON object per line each way. The child says {"ready": true} once started; the
parent sends {"template": text} once, then {"variables": {...}} per render; each is answered
{"text": ...} ("" for the template) or {"error": kind, "message": ...}, kind "syntax" (the
template does not compile: compiled there, since Jinja folds constant expressions as it
compiles), "refused" (a TemplateError: raise_exception, or the sandbox's SecurityError),
"memory", or "failed" (anything else the template raised).
"""

import contextlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import jinja2.utils

MIN_JINJA = (3, 1, 6)
STARTUP_SECONDS = 60.0  # an interpreter importing jinja2 from a slow shared filesystem


class TemplateRefused(Exception):
    """A template or a render stopped: `kind` is "syntax", "refused", "failed", "memory",
    "time" or "died"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def check_jinja() -> None:
    """RuntimeError for a jinja2 with known sandbox escapes."""
    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < MIN_JINJA:
        raise RuntimeError(
            f"jinja2 {jinja2.__version__} has known sandbox escapes: chat templates need "
            f">= {'.'.join(map(str, MIN_JINJA))} (pip install -U jinja2)"
        )


def sandbox_environment() -> jinja2.Environment:
    """Jinja's immutable sandbox, set up as transformers renders chat templates: the helpers
    templates are written against (`raise_exception`, `strftime_now`, a `tojson` that keeps
    non-ASCII text and HTML characters), trimmed blocks, loop controls."""
    check_jinja()

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own escapes HTML characters, which would change a prompt's text.
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now, namespace=_Namespace
    )
    return env


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace (a record a template's loops may write), refusing underscore-prefixed
    names: nothing a template stores can shadow Python's internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"a namespace attribute may not start with an underscore: {name!r}"
        )


class SandboxedTemplate:
    """`text` compiled in a child process: `render(**variables)` returns the text, or raises
    TemplateRefused. At most `memory_bytes` more than the child's start-up size, `seconds` per
    render (and for the compilation: Jinja folds constant expressions as it compiles). Thread-
    safe (renders take turns). A template that does not compile raises TemplateRefused of kind
    "syntax" at construction."""

    def __init__(self, text: str, memory_bytes: int, seconds: float) -> None:
        check_jinja()  # before any child starts
        self.text, self.memory_bytes, self.seconds = text, memory_bytes, seconds
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        with self._lock:
            self._start()

    def render(self, **variables: Any) -> str:
        request = json.dumps({"variables": variables}).encode() + b"\n"
        with self._lock:
            if self._child is not None and self._child.poll() is not None:
                self._stop()  # it ended while idle (killed from outside): not this render's doing
            if self._child is None:
                self._start()
            reply = self._ask(request, self.seconds, "time")
        if "error" in reply:
            raise TemplateRefused(reply["error"], reply["message"])
        return reply["text"]

    def __del__(self) -> None:
        if getattr(self, "_child", None) is not None:
            self._stop()

    def _start(self) -> None:
        # -P: nothing prepended to sys.path, so only the package root (given below) is searched
        # before the interpreter's own paths; SIGINT is the parent's to handle.
        root = str(Path(__file__).resolve().parents[2])
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        )
        self._child = subprocess.Popen(
            [sys.executable, "-P", "-m", __name__, str(self.memory_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._ask(b"", STARTUP_SECONDS, "died")  # its {"ready": true}
        reply = self._ask(
            json.dumps({"template": self.text}).encode() + b"\n", self.seconds, "time"
        )
        if "error" in reply:
            self._stop()
            raise TemplateRefused(reply["error"], reply["message"])

    def _stop(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.kill()
            child.wait()
            for pipe in (child.stdin, child.stdout):
                assert pipe is not None
                with contextlib.suppress(BrokenPipeError):  # a request it never read, unsent
                    pipe.close()

    def _ask(self, request: bytes, seconds: float, late: str) -> dict[str, Any]:
        """Send one line (if any) and read the answer's; past `seconds` (or if the child is
        gone) the child is killed and TemplateRefused(late or "died") raised."""
        child = self._child
        assert child is not None and child.stdin is not None and child.stdout is not None
        deadline = time.monotonic() + seconds
        try:
            if request:
                child.stdin.write(request)
                child.stdin.flush()
        except BrokenPipeError:
            pass  # the child is gone: the read below sees the end of its output
        out, fd = bytearray(), child.stdout.fileno()
        ready = select.poll()  # not select(): a busy server's descriptors pass 1024
        ready.register(fd, select.POLLIN)
        while not out.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not ready.poll(left * 1e3):
                self._stop()
                raise TemplateRefused(late, f"ran past {seconds:g} s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                code = child.wait()
                self._stop()
                raise TemplateRefused("died", f"its render process ended (exit code {code})")
            out += chunk
        return json.loads(out)


def _serve(memory_bytes: int) -> None:
    """The child: cap the address space, compile the template, render until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # the current size (Linux), so the bound is what a render may add to it
        base = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        base = 0
    limit = base + memory_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:  # the site's own cap (ulimit -v) may be lower: keep it
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    environment, template = sandbox_environment(), None
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(b'{"ready": true}\n')
    stdout.flush()
    for line in stdin:
        request = json.loads(line)
        try:
            if "template" in request:
                template, reply = environment.from_string(request["template"]), {"text": ""}
            else:
                assert template is not None, "a render before the template"
                reply = {"text": template.render(**request["variables"])}
        except jinja2.TemplateSyntaxError as e:
            reply = {"error": "syntax", "message": str(e)}
        except jinja2.TemplateError as e:
            reply = {"error": "refused", "message": str(e)}
        except MemoryError:
            reply = {"error": "memory", "message": f"ran past its {memory_bytes >> 20} MiB bound"}
        except Exception as e:  # the template's own arithmetic or types, on these variables
            reply = {"error": "failed", "message": f"{type(e).__name__}: {e}"}
        stdout.write(json.dumps(reply).encode() + b"\n")
        stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
