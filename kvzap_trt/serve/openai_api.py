"""OpenAI-compatible HTTP front on an EngineLoop: /v1/models, /v1/chat/completions, /v1/completions,
/v1/embeddings (KV embeddings, kvzap_trt/kvcoe).

It runs in the process that owns the engine, so every door (Triton's /generate, /infer,
/generate_stream, and this one) feeds the same EngineLoop, scheduler and KV pool. Under
`kvzap-trt serve --openai-port` that is the Triton core model's process (`triton_core.py` starts
it when `KVZAP_TRT_OPENAI` says host:port); tests build it on an EngineLoop directly.

What is served (FastAPI, uvicorn, sse-starlette):
- `stream` by server-sent events (`data: {chunk}` ... `data: [DONE]`); a client that goes away
  cancels its request, whose blocks return to the pool at the engine's next step.
- `max_tokens` / `max_completion_tokens` (chat: default the rest of the context; completions:
  16, as OpenAI), `temperature` (default 1, as OpenAI; 0 is greedy), `top_p`, `seed` (absent: a
  fresh random seed), `stop` (a string or up to 4), `n` = 1 only, `stream_options.include_usage`.
- `usage`: prompt, completion and total tokens, plus `kv_compression_ratio` (evicted / all KV
  pairs of the request, kvpress's figure) and `kv_bytes` (KV bytes it held at its end).
- `reasoning` (an extra body field, kvzap-trt's): "auto" | "fast" | "slow" (kvzap_trt/kvcoe/reasoning.py;
  "auto" needs the server's --probe); the answer then carries `reasoning`: {"requested", "used",
  "p_slow"} (streams: on the last chunk).
- Errors: OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, 400 for bad input
  (malformed JSON and wrongly typed fields included; `param` the field at fault), 404 for an
  unknown model (`model_not_found`). Codes: `context_length_exceeded` (prompt + max_tokens past
  the context), `kv_pool_exhausted` (the pool cannot take the prompt, or cannot hold the answer
  past some token: then also as a stream's last event), `unsupported_parameter`; 500 (type
  `server_error`, code `internal_error`) when a step fails (every request in flight gets it; the
  server goes on).
- `"kv_coe": true` (an extra body field; `extra_body` in the openai client) on chat/completions:
  each choice carries `kv_coe_score`, the answer's KV-CoE self-evaluation (kvzap_trt/kvcoe/coe.py;
  higher: more likely right; null where undefined), in the last chunk's choice when streaming.
  Clients ignore the unknown field; the official Python client exposes it as `choice.kv_coe_score`.
- `"evict": false` (an extra body field, kvzap-trt's) on chat/completions: KVzap evicts nothing of
  this request (its cache is dense, `usage.kv_compression_ratio` 0), for a request that needs every
  token; the others in the batch are evicted as always. Default true.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import socket
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from sse_starlette import EventSourceResponse

from kvzap_trt.config import REASONING_MODES
from kvzap_trt.errors import INTERNAL_ERROR, KvzapError
from kvzap_trt.kvcoe.reasoning import Reasoning
from kvzap_trt.serve.engine_loop import EngineLoop, Event, Job
from kvzap_trt.serve.protocol import BadRequest, GenerationParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy /v1/completions default


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class _Sampling(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored; known but unsupported ones with a
    value other than their default are refused (`_refuse_unsupported`)."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-2**63, lt=2**64)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    kv_coe: StrictBool | None = False  # kvzap-trt's: return each choice's kv_coe_score
    evict: StrictBool | None = True  # kvzap-trt's: false keeps every token of this request
    reasoning: Literal[REASONING_MODES] | None = None  # kvzap-trt's fast/slow switch (kvzap_trt/kvcoe/reasoning.py)


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(BaseModel):
    """/v1/embeddings: one text, a list of texts, or token ids (one list or a list of lists)."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    evict: StrictBool | None = True  # kvzap-trt's: false embeds the uncompressed cache


UNSUPPORTED = {  # field: value that means "not used"
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "best_of": (None, 1), "echo": (None, False),
    "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "audio": (None,),
    "modalities": (None, ["text"]), "response_format": (None, {"type": "text"}),
}


def _refuse_unsupported(req: _Sampling) -> None:
    if req.n not in (None, 1):
        raise OpenAIError(400, f"n must be 1 (one choice per request), got {req.n}", "n")
    for name, unused in UNSUPPORTED.items():
        if name in (req.model_extra or {}) and req.model_extra[name] not in unused:
            raise OpenAIError(400, f"{name} is not supported by kvzap-trt", name, "unsupported_parameter")


def _stop_words(stop: str | list[str] | None) -> list[str]:
    words = [stop] if isinstance(stop, str) else list(stop or [])
    if len(words) > 4:
        raise OpenAIError(400, f"stop takes at most 4 sequences, got {len(words)}", "stop")
    return [w for w in words if w]


def _text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise OpenAIError(400, f"only text content parts are supported, got type {part.get('type')!r}",
                              "messages")
        parts.append(part["text"])
    return "".join(parts)


class _Pending:
    """One request's events, carried from the engine thread to the event loop."""

    def __init__(self) -> None:
        self.aloop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, ev: Event) -> None:  # engine thread; raises once the event loop is closed
        self.aloop.call_soon_threadsafe(self.queue.put_nowait, ev)


def _include_usage(req: _Sampling) -> bool:
    return bool((req.stream_options or {}).get("include_usage"))


def _usage(prompt_tokens: int, ev: Event) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": prompt_tokens + ev.completion_tokens,
            "kv_compression_ratio": ev.compression_ratio, "kv_bytes": ev.kv_bytes}


def _engine_error(ev: Event) -> OpenAIError:
    """The failed event's error: 500 server_error for a fault of the server, 400 otherwise."""
    if ev.error_code == INTERNAL_ERROR:
        return OpenAIError(500, ev.error, type="server_error", code=INTERNAL_ERROR)
    return OpenAIError(400, ev.error, code=ev.error_code)


def create_app(loop: EngineLoop, model_id: str) -> FastAPI:
    """The OpenAI-compatible app on `loop`; `model_id` is the one model `/v1/models` lists."""
    app = FastAPI(title="kvzap-trt OpenAI-compatible API", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, e: OpenAIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: {err.get('msg')}"
                            for err in errors[:5])
        return OpenAIError(400, message or "invalid request", param).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return OpenAIError(500, f"internal error: {e}", type="server_error", code=INTERNAL_ERROR).response()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "kvzap-trt"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    def check_model(req: _Sampling) -> None:
        if req.model != model_id:
            raise OpenAIError(404, f"The model {req.model!r} does not exist; this server serves {model_id!r}",
                              "model", "model_not_found")

    def params_of(req: _Sampling, max_tokens: int | None, prompt: str) -> GenerationParams:
        check_model(req)
        _refuse_unsupported(req)
        temperature = 1.0 if req.temperature is None else req.temperature
        return GenerationParams(
            prompt=prompt, max_tokens=max_tokens or 1, temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed if req.seed is not None else secrets.randbits(63),
            stop_words=_stop_words(req.stop), stream=bool(req.stream), kv_coe=bool(req.kv_coe),
            reasoning=req.reasoning, evict=req.evict is not False)

    def reasoning_of(req: _Sampling) -> Reasoning | None:
        try:
            return loop.runtime.reasoning(req.reasoning)
        except KvzapError as e:
            raise OpenAIError(400, str(e), "reasoning") from None

    def prepared(params: GenerationParams, ids: list[int] | None, max_tokens: int | None,
                 default_max: int | None, param: str) -> list[int]:
        """The request's token ids, checked; `param` names the field the prompt came in (an
        error about the prompt's tokens points there, as OpenAI's context_length_exceeded does)."""
        try:
            if ids is None:
                ids = loop.runtime.encode(params.prompt)
            if max_tokens is None:
                params.max_tokens = default_max if default_max is not None else max(1, loop.engine.max_seq_len - len(ids))
            return loop.prepare(params, ids)
        except BadRequest as e:
            raise OpenAIError(400, str(e), param, e.code) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        max_tokens = req.max_completion_tokens or req.max_tokens
        if req.max_completion_tokens and req.max_tokens and req.max_completion_tokens != req.max_tokens:
            raise OpenAIError(400, "max_tokens and max_completion_tokens disagree; give one", "max_tokens")
        params = params_of(req, max_tokens, "")
        plan = reasoning_of(req)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
                    for m in req.messages]
        try:
            ids = await asyncio.to_thread(
                lambda: list(loop.runtime.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False)))
        except Exception as e:  # noqa: BLE001 - a template that refuses these messages
            raise OpenAIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        ids = prepared(params, ids, max_tokens, None, "messages")
        return await _answer(request, params, ids, "chat", _include_usage(req), plan)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt, ids = req.prompt, None
        if isinstance(prompt, list):
            if prompt and isinstance(prompt[0], list):
                if len(prompt) != 1:
                    raise OpenAIError(400, "one prompt per request", "prompt")
                prompt = prompt[0]
            if prompt and all(isinstance(t, int) for t in prompt):
                ids, prompt = list(prompt), ""
            elif len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            else:
                raise OpenAIError(400, "prompt: one string or one list of token ids per request", "prompt")
        if ids is None and not prompt.strip():
            raise OpenAIError(400, "prompt is empty", "prompt")
        params = params_of(req, req.max_tokens, prompt)
        plan = reasoning_of(req)
        ids = prepared(params, ids, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")
        return await _answer(request, params, ids, "text", _include_usage(req), plan)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request):
        """KV embeddings (kvzap_trt/kvcoe) read from the engine's cache after each input's prefill,
        under the served eviction policy (`"evict": false`: of the whole cache); `usage` adds the mean
        kv_compression_ratio."""
        check_model(req)
        inputs = req.input if isinstance(req.input, list) and req.input and not isinstance(req.input[0], int) \
            else [req.input]
        if not inputs or any(not x or (isinstance(x, str) and not x.strip()) for x in inputs):
            raise OpenAIError(400, "input must be a non-empty string, token list or list of them", "input")
        dim = loop.engine.embedder.dim(loop.engine.cache.spec.num_kv_heads, loop.engine.cache.spec.head_dim)
        if req.dimensions not in (None, dim):
            raise OpenAIError(400, f"dimensions: this model's KV embedding has {dim}", "dimensions")
        pendings, tokens = [], 0
        for x in inputs:
            params = GenerationParams(prompt=x if isinstance(x, str) else "", max_tokens=0, evict=req.evict is not False)
            ids = prepared(params, None if isinstance(x, str) else list(x), 0, 0, "input")
            pending = _Pending()
            job = Job(params, ids, emit=pending.emit, is_cancelled=pending.cancelled.is_set, embed=True)
            loop.submit(job)
            pendings.append((pending, job))
            tokens += len(ids)
        data, ratios = [], []
        try:
            for i, (pending, job) in enumerate(pendings):
                ev = await pending.queue.get()
                if ev.error is not None:
                    raise _engine_error(ev)
                e = job.request.embedding
                vec = base64.b64encode(e.numpy().astype("<f4").tobytes()).decode() \
                    if req.encoding_format == "base64" else e.tolist()
                data.append({"object": "embedding", "index": i, "embedding": vec})
                ratios.append(ev.compression_ratio)
        finally:
            for pending, _ in pendings:
                pending.cancelled.set()  # a request still running (an error above) is dropped
        return {"object": "list", "data": data, "model": model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                          "kv_compression_ratio": sum(ratios) / len(ratios)}}

    async def _answer(request: Request, params: GenerationParams, ids: list[int], kind: str, include_usage: bool,
                      plan: Reasoning | None = None):
        pending = _Pending()
        job = Job(params, ids, emit=pending.emit, is_cancelled=pending.cancelled.is_set, reasoning=plan)
        loop.submit(job)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "created": int(time.time()), "model": model_id}
        if params.stream:
            return EventSourceResponse(_stream(pending, head, kind, len(ids), include_usage, job),
                                       ping=15, send_timeout=30)
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(pending.queue.get(), timeout=1.0)
                    break
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        pending.cancelled.set()
                        raise OpenAIError(499, "client disconnected") from None
        except asyncio.CancelledError:
            pending.cancelled.set()
            raise
        if ev.error is not None:
            raise _engine_error(ev)
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": ev.text},
                      "logprobs": None, "finish_reason": ev.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}
            obj = "text_completion"
        if params.kv_coe:
            choice["kv_coe_score"] = ev.kv_coe_score
        return {**head, "object": obj, "choices": [choice], "usage": _usage(len(ids), ev), **_reasoning(plan, ev)}

    def _reasoning(plan: Reasoning | None, ev: Event) -> dict[str, Any]:
        if plan is None:
            return {}
        return {"reasoning": {"requested": plan.mode, "used": ev.reasoning, "p_slow": ev.reasoning_p_slow}}

    async def _stream(pending: _Pending, head: dict, kind: str, prompt_tokens: int, include_usage: bool, job: Job):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False, **extra: Any) -> str:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if finish is not None and job.params.kv_coe:
                choice["kv_coe_score"] = job.request.kv_coe_score
            return json.dumps({**head, "object": obj, "choices": [choice], **extra})

        try:
            if kind == "chat":
                yield {"data": chunk(None, None, first=True)}
            while True:
                ev = await pending.queue.get()
                if ev.error is not None:
                    e = _engine_error(ev)
                    yield {"data": json.dumps({"error": {"message": e.message, "type": e.type, "param": None,
                                                         "code": e.code}})}
                    return
                if ev.text:
                    yield {"data": chunk(ev.text, None)}
                if ev.final:
                    yield {"data": chunk(None, ev.finish_reason, **_reasoning(job.reasoning, ev))}
                    if include_usage:
                        yield {"data": json.dumps({**head, "object": obj, "choices": [],
                                                   "usage": _usage(prompt_tokens, ev)})}
                    yield {"data": "[DONE]"}
                    return
        finally:
            # Normal end, client gone (the task is cancelled) or a send timeout: the engine drops
            # a request that is still running at its next step, and its blocks return.
            pending.cancelled.set()

    return app


class OpenAIServer:
    """uvicorn serving `create_app(loop, model_id)` from a daemon thread.

    The socket is bound in the constructor, so a port in use fails at once (and fails the
    Triton model that starts it) rather than in the thread.
    """

    def __init__(self, loop: EngineLoop, model_id: str, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                         reuse_port=False)
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(create_app(loop, model_id), log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="kvzap-openai", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout_s: float = 30.0) -> "OpenAIServer":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the OpenAI server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self.sock.close()
