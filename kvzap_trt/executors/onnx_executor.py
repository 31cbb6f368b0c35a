"""The ONNX executor: the graph of `kvzap-trt export` on ONNX Runtime (CPU).

The graph's own ops run in ONNX Runtime; its two plugin nodes run the PyTorch references
(`ort_ops.py`). The cache goes in as graph inputs and comes back as the last evict node's outputs,
which are copied into the engine's `PagedKVCache`, so the engine, its scheduler and its cache are
the PyTorch executor's. Window and threshold are baked into the graph (plugin fields): the
executor refuses a cache or policy that differs from what was exported. The ONNX Runtime graph
optimisations beyond `basic` (fusions that change arithmetic) are off: what runs is the graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kvzap_trt.cache.paged_cache import PagedKVCache
from kvzap_trt.errors import KvzapError
from kvzap_trt.executors import StepInputs
from kvzap_trt.executors.ort_ops import ORT_DOMAIN, import_ort, register
from kvzap_trt.export import check_cache_shape, check_policy, load_exported
from kvzap_trt.export.plugins import DOMAIN, cache_tensors, step_max_keys
from kvzap_trt.ops.cuda_kernels import raise_kernel_error
from kvzap_trt.surrogate import Surrogate

# ONNX Runtime's key for the folder of external weights when the model comes from memory.
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


class OnnxExecutor:
    name = "onnx"

    def __init__(self, path: Path, window: int, threshold: float, surrogate: Surrogate | None,
                 threads: int | None = None):
        """path: model.onnx of `kvzap-trt export`; window, threshold, surrogate: what the engine
        runs with, checked against what the graph was exported with."""
        ort, _ = import_ort()
        path = Path(path)
        m, self.meta = load_exported(path)
        if self.meta["dtype"] != "float32":
            raise KvzapError(f"{path} is a {self.meta['dtype']} graph; the ONNX executor runs float32 ones "
                             "(its plugin bindings are float32): run with --dtype float32")
        check_policy(self.meta, path, window, threshold, surrogate)
        # The plugin nodes move to onnxruntime-extensions' domain, where the Python ops live.
        for node in m.graph.node:
            if node.domain == DOMAIN:
                node.domain = ORT_DOMAIN
        for imp in m.opset_import:
            if imp.domain == DOMAIN:
                imp.domain, imp.version = ORT_DOMAIN, 1
        so = ort.SessionOptions()
        so.register_custom_ops_library(register())
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(path.parent))
        if threads:
            so.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types vary by version
            raise KvzapError(f"ONNX Runtime cannot load {path}: {e}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.path = path

    def _check_cache(self, cache: PagedKVCache) -> None:
        spec = cache.spec
        if cache.device.type != "cpu":
            raise KvzapError(f"the ONNX executor runs on CPU; the cache is on {cache.device}")
        if spec.dtype != torch.float32:
            raise KvzapError(f"the ONNX executor runs float32; the cache is {str(spec.dtype).removeprefix('torch.')}")
        check_cache_shape(self.meta, spec, "graph")

    def forward(self, step: StepInputs, cache: PagedKVCache) -> torch.Tensor:
        self._check_cache(cache)
        state = cache_tensors(cache)
        feeds = {
            "tokens": step.tokens, "positions": step.positions, "never_evict": step.never_evict,
            "logits_at": step.logits_at.long(), "cu_seqlens": step.cu_seqlens, "seq_slots": step.seq_slots,
            "ctx_lens": step.ctx_lens, **state,
        }
        feeds = {k: v.numpy() for k, v in feeds.items()}
        feeds["error"] = np.zeros(1, np.int32)  # zeroed once per step, as the host does for the plugins
        feeds["max_keys"] = np.zeros(step_max_keys(step, cache), np.int32)  # its length is the step's key bound
        out = dict(zip(self.output_names, self.session.run(None, feeds)))
        for name, t in state.items():
            t.copy_(torch.from_numpy(out[f"{name}_out"]))
        raise_kernel_error(int(out["error_out"][0]))
        return torch.from_numpy(out["logits"])
