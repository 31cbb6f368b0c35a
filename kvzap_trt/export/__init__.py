"""ONNX export: the Llama / Qwen3 forward with KVzap and the two plugin nodes, one graph for
ONNX Runtime (the ONNX executor, CPU) and TensorRT's ONNX parser (the engine).

Decision: the graph is built directly with `onnx.helper` from the model's weights
(`graph.py`), not traced with `torch.onnx.export` + `torch.library` custom ops. Reasons:
- The plugins update the cache in place and hand it on (aliased outputs). A traced custom op
  that mutates its inputs is functionalised by the exporter into copies whose outputs and order
  it chooses; here every node carries exactly the plugin's inputs, outputs and fields
  (`plugins.py`, checked against plugins/trt/*/README.md by the tests), in the plugin's order.
- The forward is ~15 ops per layer: writing them is shorter than a translation table, needs no
  onnxscript or dynamo tracing (minutes and several copies of the weights for an 8B model),
  and reads the weights straight from the loaded model, so the graph holds exactly the tensors
  the PyTorch executor runs.
- The price is a second description of the forward; tests/test_onnx_export.py runs both under
  one engine and requires identical tokens and kept positions.

`export_onnx(model, surrogate, window, threshold, out)` writes `out/model.onnx` (weights in
`model.onnx.data` when they pass 2 GB, or on request) and `out/export.json`, checked with
`onnx.checker`, through a temporary directory renamed when complete.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvzap_trt.atomic import atomic_dir
from kvzap_trt.errors import KvzapError

if TYPE_CHECKING:
    from kvzap_trt.cache.paged_cache import CacheSpec
    from kvzap_trt.models.transformer import Transformer
    from kvzap_trt.surrogate import Surrogate

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "export.json"
PROTO_LIMIT = 2**31 - 2**24  # protobuf's 2 GiB limit, less room for the graph itself


def import_onnx():
    try:
        import onnx
    except ImportError:
        raise KvzapError("ONNX export needs the `onnx` package: pip install 'onnx>=1.17'") from None
    return onnx


def export_metadata(model: "Transformer", surrogate: "Surrogate | None", window: int, threshold: float,
                    source: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the graph bakes in: the ONNX executor checks it against the cache and policy it serves."""
    cfg = model.cfg
    return {
        "window": int(window),
        "threshold": float(threshold),
        "surrogate": None if surrogate is None else {"kind": surrogate.kind, "source": surrogate.source},
        "dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch."),
        "model": {"family": cfg.family, "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
                  "num_heads": cfg.num_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size},
        **({"source": source} if source else {}),
    }


def export_onnx(model: "Transformer", surrogate: "Surrogate | None", window: int, threshold: float, out: Path,
                external_data: bool | None = None, source: dict[str, Any] | None = None) -> Path:
    """Write the graph to `out` (a directory, replaced atomically); returns the model file's path.

    external_data: None = only when the weights pass 2 GB; True / False to force.
    """
    onnx = import_onnx()
    from kvzap_trt.export.graph import build_graph

    if window < 0:
        raise KvzapError(f"window must be >= 0, got {window}")
    if not math.isfinite(threshold):
        raise KvzapError(f"threshold must be finite, got {threshold}")
    meta = export_metadata(model, surrogate, window, threshold, source)
    m = build_graph(model, surrogate, window, threshold, {"kvzap_trt": json.dumps(meta)})
    weight_bytes = sum(len(t.raw_data) for t in m.graph.initializer)
    external = weight_bytes > PROTO_LIMIT if external_data is None else external_data
    out = Path(out)
    try:
        with atomic_dir(out) as tmp:
            path = tmp / MODEL_FILE
            if external:
                onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=DATA_FILE, size_threshold=1024)
            else:
                onnx.save_model(m, str(path))
            onnx.checker.check_model(str(path), full_check=False)
            (tmp / META_FILE).write_text(json.dumps({**meta, "external_data": external,
                                                     "weight_bytes": weight_bytes}, indent=2) + "\n")
    except PermissionError as e:
        raise KvzapError(f"cannot write {out}: {e.strerror}") from None
    return out / MODEL_FILE


def load_exported(path: Path) -> tuple[Any, dict[str, Any]]:
    """(ModelProto without its external weights, the export metadata) of a kvzap-trt export;
    KvzapError when the file is missing, not ONNX, or not ours."""
    onnx = import_onnx()
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # a missing file, or bytes that are not an ONNX model
        raise KvzapError(f"cannot read ONNX model {path}: {e}") from None
    props = {p.key: p.value for p in m.metadata_props}
    if "kvzap_trt" not in props:
        raise KvzapError(f"{path} was not exported by kvzap-trt (no kvzap_trt metadata)")
    return m, json.loads(props["kvzap_trt"])


def read_metadata(path: Path) -> dict[str, Any]:
    """The export metadata stored in a model file (not its weights)."""
    return load_exported(path)[1]


def check_policy(meta: dict[str, Any], path: Path, window: int, threshold: float, surrogate: "Surrogate | None") -> None:
    """KvzapError unless the window, threshold and surrogate an export baked into its plugin
    fields (`meta`, from load_exported or an engine's copy of it) are the engine's."""
    import numpy as np

    mismatches = []
    if meta["window"] != window:
        mismatches.append(f"window {meta['window']} (engine: {window})")
    if np.float32(meta["threshold"]) != np.float32(threshold):  # the plugin field is float32
        mismatches.append(f"threshold {meta['threshold']} (engine: {threshold})")
    exported = meta["surrogate"]
    if (exported is None) != (surrogate is None) or (
            surrogate is not None and (exported["kind"], exported["source"]) != (surrogate.kind, surrogate.source)):
        mine = None if surrogate is None else f"{surrogate.kind} {surrogate.source}"
        theirs = None if exported is None else f"{exported['kind']} {exported['source']}"
        mismatches.append(f"surrogate {theirs} (engine: {mine})")
    if mismatches:
        raise KvzapError(f"{path} was exported with {', '.join(mismatches)}: export it again with these settings")


def check_cache_shape(meta: dict[str, Any], spec: "CacheSpec", what: str) -> None:
    """KvzapError unless the cache's layers, kv heads, head dim and window are the export's
    (`what` names the graph or engine in the message)."""
    m = meta["model"]
    mine = (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.window)
    theirs = (m["num_layers"], m["num_kv_heads"], m["head_dim"], meta["window"])
    if mine != theirs:
        raise KvzapError(f"the cache (layers, kv heads, head dim, window) = {mine} does not fit the {what}'s {theirs}")
