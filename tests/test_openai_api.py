"""The OpenAI-compatible front (kvzap_trt/serve/openai_api.py) with the official `openai` client,
served by uvicorn on a free loopback port over an EngineLoop on SmolLM2 (window 8, so these short
prompts evict). Answers are checked against `Runtime.generate`, the CLI's path."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from kvzap_trt.config import resolve_config
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.serve.engine_loop import EngineLoop
from kvzap_trt.serve.openai_api import OpenAIServer
from tests.test_engine_loop import PROMPTS

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def runtime(smollm2_dir):
    return Runtime.from_config(resolve_config(MODEL, window=8, kv_cache_mb=24, max_seqs=16))


@pytest.fixture(scope="module")
def served(runtime):
    loop = EngineLoop.from_runtime(runtime).start()
    server = OpenAIServer(loop, MODEL).start()
    yield loop, server
    server.stop()
    loop.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1].url, api_key="unused", max_retries=0, timeout=120)


def chat_ids(runtime, content):
    return list(runtime.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=True, return_dict=False))


def wait_idle(loop, timeout=30):
    deadline = time.monotonic() + timeout
    while (loop.jobs or loop.engine.running or loop.engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not (loop.jobs or loop.engine.running or loop.engine.waiting)


def test_models_and_greedy_chat_equal_generate(client, runtime, served):
    assert [m.id for m in client.models.list()] == [MODEL]
    question = "What is the capital of France?"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                       max_tokens=12, temperature=0)
    ids = chat_ids(runtime, question)
    want = runtime.generate([ids], runtime.sampling(max_new_tokens=12))[0]
    assert r.object == "chat.completion" and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == {"stop": "stop", "length": "length"}[want.finish_reason]
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(ids), len(want.token_ids), len(ids) + len(want.token_ids))
    assert u.model_extra["kv_bytes"] == want.kv["bytes_allocated"] > 0
    assert u.model_extra["kv_compression_ratio"] == pytest.approx(want.kv["compression_ratio"])
    assert u.model_extra["kv_compression_ratio"] > 0  # window 8: the chat prompt was really pruned

    c = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0)
    want = runtime.generate([runtime.encode(PROMPTS[0])], runtime.sampling(max_new_tokens=10))[0]
    assert c.object == "text_completion" and c.choices[0].text == want.text
    assert c.usage.prompt_tokens == len(runtime.encode(PROMPTS[0])) and c.usage.completion_tokens == 10
    assert wait_idle(served[0]) and served[0].engine.cache.allocator.num_used == 0


def test_evict_false_keeps_every_token_of_that_request(client, runtime):
    messages = [{"role": "user", "content": PROMPTS[1]}]
    ids = chat_ids(runtime, PROMPTS[1])
    (want,) = Runtime(runtime.cfg, runtime.loaded, None).generate([ids], runtime.sampling(max_new_tokens=8))
    kept, pruned = (client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                   extra_body=extra) for extra in ({"evict": False}, {}))
    assert kept.choices[0].message.content == want.text
    assert kept.usage.model_extra["kv_bytes"] == want.kv["bytes_allocated"]
    assert kept.usage.model_extra["kv_compression_ratio"] == 0 < pruned.usage.model_extra["kv_compression_ratio"]


def test_stream_deltas_join_to_the_unstreamed_text(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three fruits."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 3 and "".join(deltas) == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.model_extra["kv_bytes"] == full.usage.model_extra["kv_bytes"]

    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True)
    pieces = [c.choices[0].text for c in streamed]
    assert len(pieces) > 3
    assert "".join(pieces) == client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12,
                                                        temperature=0).choices[0].text


def test_stop_sequences_cut_stream_and_answer_alike(client, runtime):
    free = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=0).choices[0].text
    # A stop word straddling two tokens (2 characters of each side of a token boundary, first seen
    # there): the stream must hold back the first half until the second shows it is the stop word.
    ids = runtime.generate([runtime.encode(PROMPTS[1])], runtime.sampling(max_new_tokens=20))[0].token_ids
    bounds = [len(runtime.tokenizer.decode(ids[:k])) for k in range(1, len(ids))]
    assert runtime.tokenizer.decode(ids) == free
    b = next(b for b in bounds[2:] if b >= 2 and free.find(free[b - 2 : b + 2]) == b - 2
             and len(free[b - 2 : b + 2]) == 4 and bounds.count(b) == 1)
    stop = [free[b - 2 : b + 2], "zzz"]
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=stop)
    assert cut.choices[0].text == free[: free.find(stop[0])] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_seed_reproduces_a_sampled_answer(client, runtime):
    def ask(seed):
        return client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=1.0,
                                         top_p=0.95, seed=seed).choices[0].text

    a, b, other = ask(7), ask(7), ask(8)
    assert a == b and a != other
    want = runtime.generate([runtime.encode(PROMPTS[2])],
                            runtime.sampling(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7))[0]
    assert a == want.text  # the same sampler as `kvzap-trt generate --seed 7`


def test_16_concurrent_streams_equal_sequential_runs(client, served):
    jobs = [(PROMPTS[i % len(PROMPTS)], 2 + (i % 4) * 2) for i in range(16)]

    def stream(job):
        prompt, n = job
        events = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=n, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in events if c.choices)

    sequential = [stream(j) for j in jobs]
    peak = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak.append(len(served[0].engine.running))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(stream, jobs))
    stop.set()
    watcher.join()
    assert concurrent == sequential and all(concurrent)
    assert max(peak) > 4  # they really ran batched
    assert wait_idle(served[0]) and served[0].engine.cache.allocator.num_used == 0


HI = [{"role": "user", "content": "hi"}]
# (endpoint, body, status, text in the message, param: the field at fault, code: OpenAI's where it has one).
# SmolLM2's context is 8192 positions and its vocabulary 49152 tokens (its config.json).
BAD = [
    ("chat/completions", {"model": MODEL, "messages": HI, "n": 2}, 400, "n must be 1", "n", None),
    ("chat/completions", {"model": "gpt-4o", "messages": HI}, 404, "The model 'gpt-4o' does not exist", "model",
     "model_not_found"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages: ", "messages", None),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role: ",
     "messages.0.role", None),
    ("chat/completions", {"model": MODEL, "messages": HI, "temperature": -1}, 400, "temperature: ", "temperature", None),
    ("chat/completions", {"model": MODEL, "messages": HI, "top_p": 1.5}, 400, "top_p: ", "top_p", None),
    ("chat/completions", {"model": MODEL, "messages": HI, "max_tokens": "many"}, 400, "max_tokens: ", "max_tokens", None),
    ("chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 0}, 400, "max_tokens: ", "max_tokens", None),
    ("chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 3, "max_completion_tokens": 4}, 400,
     "max_tokens and max_completion_tokens disagree", "max_tokens", None),
    ("chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 9000}, 400,
     "+ max_tokens (9000) exceeds the context limit of 8192", "messages", "context_length_exceeded"),
    ("chat/completions", {"model": MODEL, "messages": HI, "logprobs": True}, 400, "logprobs is not supported", "logprobs",
     "unsupported_parameter"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "only text content parts are supported, got type 'image_url'", "messages", None),
    ("completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400,
     "stop takes at most 4 sequences, got 5", "stop", None),
    ("completions", {"model": MODEL, "prompt": ""}, 400, "prompt is empty", "prompt", None),
    ("completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "one string or one list of token ids per request",
     "prompt", None),
    ("completions", {"model": MODEL, "prompt": [1, 2, 10**9], "max_tokens": 2}, 400,
     "prompt token id 1000000000 is outside the vocabulary [0, 49152)", "prompt", None),
    ("completions", {"model": MODEL, "prompt": PROMPTS[2] * 40, "max_tokens": 4}, 400, "KV blocks; the pool has",
     "prompt", "kv_pool_exhausted"),
    ("completions", {"prompt": "hi"}, 400, "model: ", "model", None),
    ("completions", {"model": MODEL, "prompt": "hi", "evict": "no"}, 400, "evict: ", "evict", None),
    ("completions", {"model": MODEL, "prompt": "hi", "seed": 2**64}, 400, "seed: ", "seed", None),  # torch's range
]


@pytest.mark.parametrize("endpoint,body,status,message,param,code", BAD, ids=[f"{e}-{i}" for i, (e, *_) in enumerate(BAD)])
def test_bad_input_gets_openai_errors_and_the_server_stays_ready(served, client, endpoint, body, status, message,
                                                                 param, code):
    url = served[1].url
    r = httpx.post(f"{url}/{endpoint}", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"], err
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code), err
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, temperature=0).choices[0].text != ""


@pytest.fixture
def small_pool(runtime):
    """A second server on the same weights whose pool holds 200 blocks (16 tokens of one head
    each): a 10-token prompt fits (a window page per head: 90 blocks), a long answer does not."""
    import dataclasses

    spec = runtime.make_cache(1, 1, 1).spec
    rt = Runtime(dataclasses.replace(runtime.cfg, kv_cache_mb=200 * spec.block_bytes / 2**20), runtime.loaded,
                 runtime.surrogate)
    loop = EngineLoop.from_runtime(rt).start()
    server = OpenAIServer(loop, MODEL).start()
    yield loop, server
    server.stop()
    loop.stop()


def sse_data(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data:").strip() for line in response.text.splitlines() if line.startswith("data:")]


def test_engine_errors_mid_answer_reach_the_client(small_pool, monkeypatch):
    """A request the pool cannot finish: 400 kv_pool_exhausted, also as a stream's last event; an
    exception inside a step: 500 server_error for the request in flight, and the server goes on."""
    loop, server = small_pool
    body = {"model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 400, "temperature": 0}
    r = httpx.post(f"{server.url}/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "cannot hold this request past" in err["message"] and err["code"] == "kv_pool_exhausted", err
    events = sse_data(httpx.post(f"{server.url}/completions", json={**body, "stream": True}, timeout=120))
    last = json.loads(events[-1])
    assert "[DONE]" not in events and last["error"]["code"] == "kv_pool_exhausted", events[-3:]
    assert wait_idle(loop) and loop.engine.cache.allocator.num_used == 0

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the forward")

    monkeypatch.setattr(loop.engine.executor, "forward", broken)
    r = httpx.post(f"{server.url}/completions", json={**body, "max_tokens": 3}, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    assert "a bug in the forward" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert wait_idle(loop) and loop.engine.cache.allocator.num_used == 0
    r = httpx.post(f"{server.url}/completions", json={**body, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]


def test_a_developer_message_is_a_system_message(client):
    """OpenAI's newer name for the system role: the same prompt through the chat template."""
    def answer(role):
        return client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
            {"role": role, "content": "Answer in French."}, {"role": "user", "content": "Name a color."}],
        ).choices[0].message.content

    plain = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Name a color."}]).choices[0].message.content
    assert answer("developer") == answer("system") != plain


def test_malformed_json_and_the_openai_client_error(served, client):
    r = httpx.post(f"{served[1].url}/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")


def test_disconnect_cancels_the_stream_and_frees_its_blocks(served):
    loop, server = served
    assert wait_idle(loop)
    total = loop.engine.cache.allocator.num_free
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # the first token arrived
        assert loop.engine.running  # the request runs
    assert wait_idle(loop, 60), "the disconnected request kept running"
    assert loop.engine.cache.allocator.num_free == total
