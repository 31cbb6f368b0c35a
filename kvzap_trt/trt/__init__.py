"""TensorRT: engine build (`build.py`), optimisation profiles (`profiles.py`) and the steps of
`kvzap-trt build --engine tensorrt` (`pipeline.py`). The executor is `executors/trt_executor.py`.

TensorRT is imported lazily, only where an engine is built or run: everything else here (the
profiles, the binding plan, the pipeline up to the ONNX) runs on a machine without it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from kvzap_trt.errors import KvzapError

PLUGIN_LIB_NAME = "libkvzap_trt_plugins.so"
# Where `cmake -S plugins -B build/plugins -DKVZAP_TRT_PLUGINS=ON ...` puts the library (plugins/README.md).
DEFAULT_PLUGIN_LIB = Path("build") / "plugins" / "trt" / PLUGIN_LIB_NAME
ENGINE_FILE = "model.plan"
ENGINE_META = "engine.json"


def default_plugin_lib() -> Path:
    """$KVZAP_TRT_PLUGIN_LIB (the Dockerfile sets it), else build/plugins/trt/libkvzap_trt_plugins.so."""
    env = os.environ.get("KVZAP_TRT_PLUGIN_LIB")
    return Path(env) if env else DEFAULT_PLUGIN_LIB


def import_tensorrt():
    """The tensorrt module, or a KvzapError naming what is missing (PyPI's `tensorrt` is a stub
    that downloads from NVIDIA's index: it may be installed and still fail to import)."""
    try:
        import tensorrt
    except Exception as e:  # ImportError, or the stub's own failure
        raise KvzapError(f"TensorRT is not available: `import tensorrt` failed ({type(e).__name__}: {e}); "
                         "use the NGC container of the Dockerfile, which has TensorRT 10.13") from None
    return tensorrt


@functools.cache
def trt_logger(trt):
    """The process's one TensorRT logger (warnings and errors): TensorRT warns when builders and
    runtimes of one process are given different loggers."""
    return trt.Logger(trt.Logger.WARNING)


_LOADED: set[Path] = set()  # plugin libraries this process has registered


def load_plugin_library(trt, path: Path) -> None:
    """Register the kvzap plugin creators (KvzapVarlenPagedAttention, KvzapEvict) with TensorRT,
    once per process and library: `IPluginRegistry::loadLibrary` fails when a creator of the
    library is registered already (a build then a run, a second executor). (Asking the registry
    for the creator first would log an error on every first load.)"""
    path = Path(path)
    if path.resolve() in _LOADED:
        return
    if not path.is_file():
        raise KvzapError(f"the kvzap TensorRT plugin library {path} does not exist: build it with "
                         "`cmake -S plugins -B build/plugins -DKVZAP_TRT_PLUGINS=ON -DTENSORRT_ROOT=<TensorRT dir> && "
                         "cmake --build build/plugins --target kvzap_trt_plugins` (plugins/README.md)")
    if trt.get_plugin_registry().load_library(str(path.resolve())) is None:
        raise KvzapError(f"TensorRT could not load the plugin library {path} (see TensorRT's log)")
    _LOADED.add(path.resolve())


def missing_for_engine(plugin_lib: Path) -> list[str]:
    """What this machine lacks to build or run a kvzap engine; [] when nothing."""
    missing = []
    try:
        import_tensorrt()
    except KvzapError:
        missing.append("the tensorrt Python package")
    import torch

    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if not Path(plugin_lib).is_file():
        missing.append(f"the plugin library {plugin_lib}")
    return missing
