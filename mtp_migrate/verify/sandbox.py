"""The child process that runs verified programs, apart from the judge (``docs/verification.md``).

The programs are code taken from the repository (only what the execution policy lets run),
so they never run in the process that judges them. They run in a separate interpreter,
started isolated (``-I -B``: neither the current folder nor ``PYTHONPATH`` is on its path,
no bytecode is written), that imports torch and ``harness.py`` by path and nothing of
mtp-migrate. It cannot create a file with content (its file-size limit is 0), dies with
the process that started it, and is killed when a run takes longer than the limit.

The protocol is a length-prefixed pickle from the judge (its own data) and a
length-prefixed ``torch.save`` back, read with ``weights_only=True``: what the child sends
cannot run code in the judge.
"""

from __future__ import annotations

import atexit
import io
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HARNESS = Path(__file__).with_name("harness.py")
_HEADER = struct.Struct("!Q")
UNBOUND_TAG = ("mtp-migrate:unbound",)  # a name the program left unbound
OBJECT_TAG = "mtp-migrate:object"  # a value that is no tensor or plain data: compared by type and repr


class SandboxTimeout(Exception):
    pass


class SandboxCrashed(Exception):
    pass


class Raised(Exception):
    """The program raised ``kind`` (its type name) in the child."""

    def __init__(self, kind: str, message: str, argument_error: bool):
        super().__init__(f"{kind}: {message}" if message else kind)
        self.kind = kind
        self.message = message
        self.argument_error = argument_error  # a TypeError or ValueError: an argument check


# -- the judge's side ---------------------------------------------------------------------

# The child dies with the thread that started it (PR_SET_PDEATHSIG), so children are started
# from one thread that lives as long as the process, not from the short-lived analysis threads.
_SPAWNER: dict[int, ThreadPoolExecutor] = {}  # by process id: a forked worker needs a thread of its own


def _spawner() -> ThreadPoolExecutor:
    if os.getpid() not in _SPAWNER:
        _SPAWNER.clear()
        _SPAWNER[os.getpid()] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtp-migrate sandbox")
    return _SPAWNER[os.getpid()]


def _child_setup() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the judge stops us
    if sys.platform == "linux":
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    try:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass


class Sandbox:
    """One child process; ``run`` sends a request and waits at most ``limit`` seconds for the answer."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.loaded: str | None = None  # the key of the programs the child holds

    def _start(self) -> None:
        command = [sys.executable, "-I", "-B", str(Path(__file__).resolve())]
        self.process = _spawner().submit(subprocess.Popen, command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, preexec_fn=_child_setup, cwd="/").result()
        self.loaded = None

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
            self.loaded = None

    def request(self, message: tuple, limit: float):
        """The child's answer to ``message``; raises ``SandboxTimeout`` (the child is killed) or ``Raised``."""
        if self.process is None or self.process.poll() is not None:
            self._start()
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.process.stdin.write(_HEADER.pack(len(payload)) + payload)
            self.process.stdin.flush()
            answer = self._read(time.monotonic() + limit)
        except (BrokenPipeError, EOFError, OSError) as error:
            self.close()
            raise SandboxCrashed(f"the verifier's child process ended ({error or 'no answer'})") from None
        except SandboxTimeout:
            self.close()
            raise
        import torch

        status, *rest = torch.load(io.BytesIO(answer), weights_only=True)
        if status == "raised":
            raise Raised(*rest)
        if status == "error":
            raise SandboxCrashed(rest[0])
        return rest[0] if rest else None

    def _read(self, deadline: float) -> bytes:
        stream = self.process.stdout
        size = _HEADER.unpack(self._exactly(stream, _HEADER.size, deadline))[0]
        return self._exactly(stream, size, deadline)

    @staticmethod
    def _exactly(stream, size: int, deadline: float) -> bytes:
        chunks, left = [], size
        descriptor = stream.fileno()
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([descriptor], [], [], remaining)[0]:
                raise SandboxTimeout
            chunk = os.read(descriptor, min(left, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


SANDBOX = Sandbox()  # this process's child: started on first use, restarted after a kill
atexit.register(SANDBOX.close)  # at once, on any exit (a killed process takes it along: PR_SET_PDEATHSIG)


def _forget_the_parents_child() -> None:
    """A forked worker starts a child of its own: the one it inherited belongs to its parent."""
    SANDBOX.process = None
    SANDBOX.loaded = None


os.register_at_fork(after_in_child=_forget_the_parents_child)


# -- the child's side ---------------------------------------------------------------------


def _load(name: str, path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _UtilityModules:
    """``import <module>`` gives the utility file that the migrated code will really import: loaded by
    path, never through the package ``__init__`` that would import the rest of the project."""

    def __init__(self):
        self.loaded: dict[str, object] = {}

    def install(self, utility: dict[str, str]) -> None:
        import types

        for name in [key for key in sys.modules if key.split(".")[0] in {m.split(".")[0] for m in utility}]:
            del sys.modules[name]
        for name, path in sorted(utility.items()):
            if path not in self.loaded:
                self.loaded[path] = _load(f"_mtp_verified_utility_{len(self.loaded)}", path)
            parts = name.split(".")
            for depth in range(1, len(parts)):
                sys.modules.setdefault(".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
            sys.modules[name] = self.loaded[path]


def _encode(value, harness):
    """Plain data for ``torch.save``: tensors (detached), numbers, strings, tags."""
    import torch

    if value is harness.UNBOUND:
        return UNBOUND_TAG
    if torch.is_tensor(value):
        return value.detach().clone()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return (OBJECT_TAG, type(value).__qualname__, repr(value)[:200])


def serve() -> None:
    """Answer requests on the original stdout until it closes; the programs' prints go nowhere."""
    if sys.path and Path(sys.path[0]).resolve() == HARNESS.parent.resolve():
        sys.path.pop(0)  # run by path: our own folder is no package to import from
    protocol_in = os.fdopen(os.dup(0), "rb")
    protocol_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    for descriptor in (0, 1, 2):
        os.dup2(devnull, descriptor)
    import warnings

    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)  # tiny tensors: threads only cost
    harness = _load("_mtp_harness", str(HARNESS))
    programs: dict = {"utility": _UtilityModules()}
    while True:
        header = protocol_in.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        message = pickle.loads(protocol_in.read(_HEADER.unpack(header)[0]))
        try:
            answer = _answer(message, programs, harness)
        except BaseException as error:  # the program's own failure is an answer, not our crash
            answer = ("raised", type(error).__name__, str(error).splitlines()[0] if str(error) else "",
                      isinstance(error, TypeError | ValueError))
        buffer = io.BytesIO()
        try:
            torch.save(answer, buffer)
        except Exception as error:
            buffer = io.BytesIO()
            torch.save(("error", f"cannot send the result: {type(error).__name__}: {error}"), buffer)
        data = buffer.getvalue()
        protocol_out.write(_HEADER.pack(len(data)) + data)
        protocol_out.flush()


def _answer(message: tuple, programs: dict, harness):
    """``("load", sources, utility)`` compiles the two programs; ``("run", name, case, inputs, outputs,
    truth)`` runs one on a case; ``("rounding", case, inputs)`` finds the least precise type the original
    rounds to (plain data: the child imports nothing of mtp-migrate)."""
    if message[0] == "load":
        _, sources, utility = message
        programs["utility"].install(utility)
        for name, source in sources.items():
            namespace = {"_mtp_box": harness._mtp_box, "_mtp_outputs": harness._mtp_outputs}
            exec(compile(source, f"<{name} program>", "exec"), namespace)
            programs[name] = namespace[name]
        return ("ok",)
    if message[0] == "rounding":
        _, case, inputs = message
        inputs = [harness.Input(*fields) for fields in inputs]
        return ("ok", harness.rounding(programs["original"], harness.make_inputs(harness.Case(**case), inputs)))
    _, name, case, inputs, outputs, truth = message
    case = harness.Case(**case)
    inputs = [harness.Input(*fields) for fields in inputs]
    results, grads = harness.run(programs[name], harness.make_inputs(case, inputs), outputs, truth)
    return ("ok", ({key: _encode(value, harness) for key, value in results.items()},
                   {key: value.detach() for key, value in grads.items()}))


if __name__ == "__main__":
    serve()
