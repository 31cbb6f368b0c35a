"""The decoupled Python-backend model that owns the engine (`<name>_stream` in the repository).

Runs under any tritonserver's Python backend (NGC container or PyTriton's bundled server):
`triton_python_backend_utils` exists only inside the backend's stub process. `execute` parses
each request and hands it to the engine loop, returning at once; the loop answers through the
request's response sender: text deltas with `stream`, else one response, always ending with
the FINAL flag. Errors in a request are answered with INVALID_ARG (HTTP 400), a fault of the
server (a failed engine step) with INTERNAL (HTTP 500): `triton_error_kind`.

With `KVZAP_TRT_OPENAI=host:port` in its environment (`kvzap-trt serve --openai-port` sets it)
the model also serves the OpenAI-compatible API (`openai_api.py`) from this process, on the
same EngineLoop: one scheduler and one KV pool for both doors. A watchdog ends the process
when its parent (tritonserver) is gone, so no stub outlives the server.
"""

from __future__ import annotations

import json
import os
import threading


from kvzap_trt.config import RunConfig
from kvzap_trt.errors import INTERNAL_ERROR, KvzapError
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.serve.engine_loop import EngineLoop, Event, Job
from kvzap_trt.serve.protocol import BadRequest, output_arrays, parse_request
from kvzap_trt.serve.server import OPENAI_ENV

METRICS = {  # name: description; gauges updated after every engine step
    "kvzap_queue_length": "requests waiting for admission",
    "kvzap_running_batch": "sequences in the running batch",
    "kvzap_kv_blocks_used": "KV cache blocks in use",
    "kvzap_kv_blocks_free": "KV cache blocks free",
    "kvzap_compression_ratio": "mean KV compression ratio of the running sequences",
}


def triton_error_kind(ev: Event) -> str:
    """The pb_utils.TritonError code of a failed event: INTERNAL for a fault of the server (HTTP
    500), INVALID_ARG for the request's (HTTP 400; the KV pool's too: a shorter request fits)."""
    return "INTERNAL" if ev.error_code == INTERNAL_ERROR else "INVALID_ARG"


def config_from_model_args(args: dict) -> RunConfig:
    params = json.loads(args["model_config"]).get("parameters", {})
    raw = params.get("kvzap_config", {}).get("string_value")
    if not raw:
        raise KvzapError("model config lacks the kvzap_config parameter")
    return RunConfig(**json.loads(raw)).validate()


def executor_from_model_args(args: dict) -> dict:
    """Runtime.from_config's executor arguments from the `kvzap_executor` parameter (absent: PyTorch)."""
    params = json.loads(args["model_config"]).get("parameters", {})
    raw = params.get("kvzap_executor", {}).get("string_value")
    if not raw:
        return {}
    spec = json.loads(raw)
    return {"executor": spec["executor"], "engine_file": spec.get("engine"), "plugin_lib": spec.get("plugin_lib")}


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        runtime = Runtime.from_config(config_from_model_args(args), **executor_from_model_args(args))
        self.loop = EngineLoop.from_runtime(runtime).start()  # the executor the repository names
        families = {
            name: pb_utils.MetricFamily(name=name, description=desc, kind=pb_utils.MetricFamily.GAUGE)
            for name, desc in METRICS.items()
        }
        self.gauges = {name: fam.Metric(labels={"model": args["model_name"]}) for name, fam in families.items()}
        self._families = families  # keep them alive
        self._metrics_stop = threading.Event()
        threading.Thread(target=self._publish_metrics, daemon=True).start()
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="kvzap-watchdog", daemon=True).start()
        self.openai = None
        spec = os.environ.get(OPENAI_ENV)
        if spec:
            from kvzap_trt.serve.openai_api import OpenAIServer

            host, _, port = spec.rpartition(":")
            cfg = self.loop.runtime.cfg
            _ = self.loop.runtime.tokenizer.chat_template  # load the template now, not on the first request
            self.openai = OpenAIServer(self.loop, cfg.preset or cfg.model, host.strip("[]"), int(port)).start()

    def execute(self, requests):
        pb = self.pb
        for request in requests:
            sender = request.get_response_sender()

            def get(name, request=request):
                t = pb.get_input_tensor_by_name(request, name)
                return None if t is None else t.as_numpy()

            try:
                params = parse_request(get)
                ids = self.loop.prepare(params)
                plan = self.loop.runtime.reasoning(params.reasoning)  # KvzapError: "auto" without a probe
            except (BadRequest, KvzapError) as e:
                self._send(sender, Event("", True, error=str(e)))
                continue
            except Exception as e:  # noqa: BLE001 - whatever our code cannot take is the request's fault
                self._send(sender, Event("", True, error=f"bad request: {type(e).__name__}: {e}"))
                continue
            self.loop.submit(Job(params, ids, emit=lambda ev, s=sender: self._send(s, ev), is_cancelled=sender.is_cancelled,
                                 close=lambda s=sender: s.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL),
                                 reasoning=plan))
        return None

    def _send(self, sender, ev: Event) -> None:
        pb = self.pb
        flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if ev.final else 0
        if ev.error is not None:
            err = pb.TritonError(ev.error, getattr(pb.TritonError, triton_error_kind(ev)))
            sender.send(pb.InferenceResponse(output_tensors=[], error=err), flags=flags)
            return
        arrays = output_arrays(ev.text, ev.compression_ratio, ev.kv_bytes, ev.kv_coe_score, ev.reasoning)
        sender.send(pb.InferenceResponse(output_tensors=[pb.Tensor(k, v) for k, v in arrays.items()]), flags=flags)

    def _publish_metrics(self) -> None:
        while not self._metrics_stop.wait(0.5):
            m = self.loop.metrics
            values = [m.queue_length, m.running, m.kv_blocks_used, m.kv_blocks_free, m.compression_ratio]
            for gauge, value in zip(self.gauges.values(), values):
                gauge.set(float(value))

    def finalize(self):
        self._metrics_stop.set()
        if self.openai is not None:
            self.openai.stop()
        self.loop.stop()


def _exit_with_parent(parent: int) -> None:
    """A stub whose tritonserver died (killed, or itself orphaned) is re-parented: leave then."""
    import time

    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)



