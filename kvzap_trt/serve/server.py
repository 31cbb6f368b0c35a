"""Start the tritonserver bundled in nvidia-pytriton on a model repository written by us."""

from __future__ import annotations

import os
import signal
import sys
import sysconfig
import time
from pathlib import Path

from kvzap_trt.errors import KvzapError


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


def start_server(repo: Path, host: str, http_port: int, grpc_port: int, metrics_port: int, verbose: bool = False):
    """Start tritonserver on `repo` and return the running pytriton `Triton` object."""
    try:
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise KvzapError("serving needs nvidia-pytriton: pip install 'kvzap-trt[serve]'") from None
    prepare_environment()
    config = TritonConfig(
        model_repository=Path(repo), http_address=host, http_port=http_port, grpc_address=host,
        grpc_port=grpc_port, metrics_address=host, metrics_port=metrics_port, allow_metrics=True,
        log_verbose=1 if verbose else None,
    )
    triton = Triton(config=config)
    try:
        triton.run()
    except Exception as e:  # noqa: BLE001 - a port in use, a broken repository, ...
        raise KvzapError(f"tritonserver did not start: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return triton


def wait_until_ready(url: str, model: str, timeout_s: float = 300.0) -> None:
    import tritonclient.http as http

    client = http.InferenceServerClient(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.is_model_ready(model):
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise KvzapError(f"model {model!r} was not ready at {url} within {timeout_s:.0f} s")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_forever(triton) -> None:
    """Block until SIGINT or SIGTERM (PyTriton stops the server on KeyboardInterrupt)."""
    signal.signal(signal.SIGTERM, _interrupt)
    triton.serve()
