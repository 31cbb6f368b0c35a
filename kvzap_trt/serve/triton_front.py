"""The non-decoupled front model (`<name>` in the repository): `/infer`, `/generate`, tritonclient.

Triton's HTTP `/infer` refuses decoupled models, and only a decoupled model can stream tokens;
so the engine lives in the decoupled core (`triton_core.py`) and this model forwards each request
to it through BLS, collects the answer and sends one response. One engine, one KV pool, for
every endpoint. `execute` returns at once; a thread per request waits on the core.
"""

from __future__ import annotations

import json
import threading

from kvzap_trt.serve.protocol import INPUTS, OUTPUTS
from kvzap_trt.serve.stub_watchdog import start_parent_watchdog


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = json.loads(args["model_config"]).get("parameters", {})
        self.core = params["core_model"]["string_value"]
        start_parent_watchdog()  # a forwarding thread must not keep an orphaned stub alive

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._forward, args=(request, request.get_response_sender()), daemon=True).start()
        return None

    def _forward(self, request, sender) -> None:
        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        inputs = []
        for name in INPUTS:
            t = pb.get_input_tensor_by_name(request, name)
            if t is not None and name not in ("stream", "streaming"):  # the front answers once
                inputs.append(pb.Tensor(name, t.as_numpy()))
        bls = pb.InferenceRequest(model_name=self.core, requested_output_names=list(OUTPUTS), inputs=inputs)
        outputs = None
        try:
            for resp in bls.exec(decoupled=True):
                if resp.has_error():
                    sender.send(pb.InferenceResponse(output_tensors=[], error=resp.error()), flags=final)
                    return
                if resp.output_tensors():
                    outputs = [pb.Tensor(t.name(), t.as_numpy()) for t in resp.output_tensors()]
        except Exception as e:  # noqa: BLE001 - the client must get an answer
            err = pb.TritonError(f"kvzap core model failed: {e}", pb.TritonError.INTERNAL)
            sender.send(pb.InferenceResponse(output_tensors=[], error=err), flags=final)
            return
        sender.send(pb.InferenceResponse(output_tensors=outputs or []), flags=final)
