"""Start the tritonserver bundled in nvidia-pytriton on a model repository written by us.

Fail fast: `check_loadable` loads model, surrogate and tokenizer in this process first, so a
missing package or file is reported in one line before tritonserver starts; tritonserver logs
to a file whose last error lines are shown if it fails later. No process outlives the server:
`ProcessReaper` records every descendant (tritonserver, the Python-backend stubs) while it
runs and kills what is left once it has stopped.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import sysconfig
import threading
import time
from pathlib import Path

from kvzap_trt.config import RunConfig
from kvzap_trt.errors import KvzapError

OPENAI_ENV = "KVZAP_TRT_OPENAI"  # host:port; the core model (triton_core.py) serves OpenAI's API there


def repository_config(repo: Path) -> RunConfig:
    """The resolved configuration `kvzap-trt build` wrote beside the models."""
    path = Path(repo) / "kvzap_config.json"
    try:
        return RunConfig(**json.loads(path.read_text(encoding="utf-8"))).validate()
    except (OSError, ValueError, TypeError) as e:
        raise KvzapError(f"{path}: {e}; write the repository with `kvzap-trt build`") from None


def check_loadable(cfg: RunConfig) -> None:
    """Load model, surrogate and tokenizer as the Triton model will; KvzapError with the cause."""
    from kvzap_trt.runtime.generate import Runtime

    what = cfg.preset or cfg.model
    try:
        rt = Runtime.from_config(cfg)
        if rt.tokenizer is None:
            raise KvzapError(f"model {what} has no tokenizer (tokenizer.json): the server takes text")
        if cfg.probe is not None:  # the probe loads and fits the model (kvzap_trt/kvcoe/reasoning.py)
            rt.reasoning("slow")
    except KvzapError as e:
        raise KvzapError(f"cannot serve {what}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a missing package, file or module: its own words, one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise KvzapError(f"cannot load {what}: {type(e).__name__}: {first}") from None


def log_tail(path: Path | None, lines: int = 8) -> str:
    """The last error lines of tritonserver's log (its error lines start with E and a date)."""
    if path is None or not Path(path).is_file():
        return ""
    text = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    errors = [t for t in text if len(t) > 1 and t[0] == "E" and t[1].isdigit()]
    return "\n".join((errors or text)[-lines:])


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(pid: int) -> set[int]:
    kids, out, todo = _children(), set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class ProcessReaper:
    """Records this process's descendants every second; `reap()` SIGKILLs those still alive
    (a Python-backend stub orphaned by a tritonserver that was killed, for instance)."""

    def __init__(self, period_s: float = 1.0):
        self.seen: dict[int, str | None] = {}
        self.killed: dict[int, str] = {}  # pid -> its command line, for the message
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(period_s,), name="kvzap-reaper", daemon=True)

    def start(self) -> "ProcessReaper":
        self._record()
        self._thread.start()
        return self

    def _record(self) -> None:
        for pid in descendants(os.getpid()):
            self.seen.setdefault(pid, _start_time(pid))

    def _watch(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            self._record()

    def reap(self, grace_s: float = 15.0) -> list[int]:
        """Kill what is left of the recorded processes after `grace_s`; returns their pids. The grace
        covers a Python-backend stub still tearing its interpreter down after tritonserver exited:
        5 s was not always enough on a loaded 2-core machine (tests/test_serve.py's SIGTERM test)."""
        self._stop.set()
        self._record()
        deadline = time.monotonic() + grace_s
        alive = []
        while True:  # the same pid with the same start time: not a reused pid
            alive = [p for p, t in self.seen.items() if t is not None and _start_time(p) == t]
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for pid in alive:
            try:
                self.killed[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass
        return alive


def prepare_environment() -> None:
    """What the bundled server and its Python-backend stub need from this interpreter.

    The stub embeds libpython (a pyenv or venv Python keeps it in LIBDIR, off the loader's
    path) and must import this environment's packages (torch, kvzap_trt).
    """
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir and libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir] + paths)
    site = [p for p in sys.path if p.endswith("site-packages")]
    here = str(Path(__file__).resolve().parents[2])
    py = [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
    os.environ["PYTHONPATH"] = ":".join(dict.fromkeys(py + [here] + site))


def start_server(repo: Path, host: str, http_port: int, grpc_port: int, metrics_port: int, verbose: bool = False,
                 log_file: Path | None = None):
    """Start tritonserver on `repo` and return the running pytriton `Triton` object."""
    try:
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise KvzapError("serving needs nvidia-pytriton: pip install 'kvzap-trt[serve]'") from None
    prepare_environment()
    config = TritonConfig(
        model_repository=Path(repo), http_address=host, http_port=http_port, grpc_address=host,
        grpc_port=grpc_port, metrics_address=host, metrics_port=metrics_port, allow_metrics=True,
        log_verbose=1 if verbose else None, log_file=None if verbose else log_file,
    )
    triton = Triton(config=config)
    try:
        triton.run()
    except Exception as e:  # noqa: BLE001 - a port in use, a broken repository, ...
        tail = log_tail(log_file)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KvzapError(f"tritonserver did not start: {first}" + (f"; its log ends:\n{tail}" if tail else "")) from None
    return triton


def wait_until_ready(url: str, model: str, timeout_s: float = 300.0, triton=None, log_file: Path | None = None) -> None:
    import tritonclient.http as http

    client = http.InferenceServerClient(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if triton is not None and not triton.is_alive():
            tail = log_tail(log_file)
            raise KvzapError(f"tritonserver stopped before {model!r} was ready" + (f"; its log ends:\n{tail}" if tail else ""))
        try:
            if client.is_model_ready(model):
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    tail = log_tail(log_file)
    raise KvzapError(f"model {model!r} was not ready at {url} within {timeout_s:.0f} s" + (f"; the log ends:\n{tail}" if tail else ""))


def wait_for_openai(host: str, port: int, timeout_s: float = 60.0) -> None:
    import httpx

    url = f"http://{host}:{port}/v1/models"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise KvzapError(f"the OpenAI-compatible API did not answer at {url} within {timeout_s:.0f} s")


_signalled = threading.Event()


def _interrupt(signum, frame) -> None:
    _signalled.set()
    raise KeyboardInterrupt


def handle_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, as SIGINT does, so the caller's cleanup runs."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)


def serve_forever(triton) -> bool:
    """Block until SIGINT or SIGTERM (PyTriton stops the server on KeyboardInterrupt) or until
    tritonserver dies; True when a signal ended it."""
    handle_sigterm()
    triton.serve()
    return _signalled.is_set()
