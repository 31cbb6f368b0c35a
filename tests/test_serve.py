"""The real server: PyTriton's bundled tritonserver on free loopback ports, loading the repository
that `kvzap-trt build` wrote, unchanged, with the OpenAI-compatible API beside it on the same
engine. SmolLM2 with window 8, so short prompts evict. The module's last test stops the server
with SIGTERM and checks that none of its processes (Python-backend stubs included) is left."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from kvzap_trt.config import resolve_config
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.serve.server import descendants
from tests.test_engine_loop import PROMPTS

pytestmark = pytest.mark.slow
FLAGS = ["--model", "smollm2-135m", "--window", "8", "--kv-cache-mb", "24", "--max-seqs", "32"]


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_dir):
    repo = tmp_path_factory.mktemp("triton") / "repo"
    subprocess.run([sys.executable, "-m", "kvzap_trt.cli", "build", *FLAGS, "--out", str(repo)], check=True,
                   capture_output=True)
    http, grpc, metrics, openai_port = free_ports(4)
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kvzap_trt.cli", "serve", "--repository", str(repo),
                             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                             "--openai-port", str(openai_port)],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, open(log.name).read()[-3000:]
        if "kvzap-trt: serving ensemble" in open(log.name).read():  # Triton and the OpenAI port are up
            break
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail("server not ready: " + open(log.name).read()[-3000:])
    state = {"base": base, "http_port": http, "metrics": f"http://127.0.0.1:{metrics}/metrics",
             "openai": f"http://127.0.0.1:{openai_port}/v1", "proc": proc, "log": log.name}
    yield state
    if proc.poll() is None:  # the last test stops it; this is for a run cut short
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="module")
def expected(smollm2_dir):
    """Greedy answers of `kvzap-trt generate` with the server's configuration, by (prompt, max_tokens)."""
    rt = Runtime.from_config(resolve_config("smollm2-135m", window=8))
    cache = {}

    def answer(prompt, max_tokens):
        if (prompt, max_tokens) not in cache:
            r = rt.generate([rt.encode(prompt)], rt.sampling(max_new_tokens=max_tokens))[0]
            cache[prompt, max_tokens] = (r.text, r.kv)
        return cache[prompt, max_tokens]

    return answer


def generate(server, prompt, max_tokens, model="ensemble", **extra):
    r = requests.post(f"{server['base']}/v2/models/{model}/generate",
                      json={"text_input": prompt, "max_tokens": max_tokens, **extra}, timeout=300)
    return r


def metric(server, name):
    for line in requests.get(server["metrics"], timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} missing")


def test_greedy_over_http_equals_generate(server, expected):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{server['http_port']}")
    for prompt in PROMPTS[:3]:
        text, kv = expected(prompt, 10)
        r = generate(server, prompt, 10)
        assert r.status_code == 200 and r.json()["text_output"] == text
        assert r.json()["kv_compression_ratio"] == pytest.approx(kv["compression_ratio"], abs=1e-6)
        assert r.json()["kv_bytes"] == kv["bytes_allocated"]

        inputs = [httpclient.InferInput("text_input", [1, 1], "BYTES"), httpclient.InferInput("max_tokens", [1, 1], "INT32")]
        inputs[0].set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
        inputs[1].set_data_from_numpy(np.array([[10]], dtype=np.int32))
        out = client.infer("ensemble", inputs)
        assert out.as_numpy("text_output")[0][0].decode() == text

        stream = requests.post(f"{server['base']}/v2/models/ensemble_stream/generate_stream",
                               json={"text_input": prompt, "max_tokens": 10, "stream": True}, timeout=300)
        events = [json.loads(line[len("data: "):]) for line in stream.text.splitlines() if line.startswith("data: ")]
        assert len(events) > 2 and "".join(e["text_output"] for e in events) == text
        # TensorRT-LLM's llmapi input names reach the same parameters
        llmapi = {"text_input": prompt, "sampling_param_max_tokens": 10, "sampling_param_temperature": 0.0}
        assert requests.post(f"{server['base']}/v2/models/ensemble/generate", json=llmapi,
                             timeout=300).json()["text_output"] == text
        stream = requests.post(f"{server['base']}/v2/models/ensemble_stream/generate_stream",
                               json={**llmapi, "streaming": True}, timeout=300)
        events = [json.loads(line[len("data: "):]) for line in stream.text.splitlines() if line.startswith("data: ")]
        assert len(events) > 2 and "".join(e["text_output"] for e in events) == text


def test_kv_coe_score_and_reasoning_over_triton(server, smollm2_dir):
    """kv_coe asks for the answer's KV-CoE score, equal to `generate --kv-coe`'s; without it (and
    without reasoning) neither output is in the response. reasoning "slow" is applied and reported; "fast" and "auto" are refused with a
    400 naming why (SmolLM2 has no thinking switch, the server no probe nor fast budget)."""
    rt = Runtime.from_config(resolve_config("smollm2-135m", window=8))
    want = rt.generate([rt.encode(PROMPTS[0])], rt.sampling(max_new_tokens=10), kv_coe=True)[0]
    r = generate(server, PROMPTS[0], 10, kv_coe=True, reasoning="slow")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text_output"] == want.text and body["reasoning_used"] == "slow"
    assert body["kv_coe_score"] == pytest.approx(want.kv_coe["coe_c"], rel=1e-5)
    import tritonclient.http as httpclient

    inputs = [httpclient.InferInput("text_input", [1, 1], "BYTES"), httpclient.InferInput("max_tokens", [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(np.array([[PROMPTS[0].encode()]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[3]], dtype=np.int32))
    plain = httpclient.InferenceServerClient(f"127.0.0.1:{server['http_port']}").infer("ensemble", inputs)
    assert plain.as_numpy("kv_coe_score") is None and plain.as_numpy("reasoning_used") is None
    assert plain.as_numpy("text_output") is not None
    assert set(generate(server, PROMPTS[0], 3).json()) == {"model_name", "model_version", "text_output",
                                                           "kv_compression_ratio", "kv_bytes"}
    for mode, message in [("fast", "has no fast mode"), ("auto", "needs a difficulty probe"), ("medium", "must be one of")]:
        r = generate(server, PROMPTS[0], 3, reasoning=mode)
        assert r.status_code == 400 and message in r.text, (mode, r.text)


def test_evict_false_keeps_every_token_of_that_request_over_triton(server, smollm2_dir):
    rt = Runtime.from_config(resolve_config("smollm2-135m", window=8))
    (want,) = Runtime(rt.cfg, rt.loaded, None).generate([rt.encode(PROMPTS[1])], rt.sampling(max_new_tokens=6))
    kept, pruned = (generate(server, PROMPTS[1], 6, **extra).json() for extra in ({"evict": False}, {}))
    assert kept["text_output"] == want.text and kept["kv_bytes"] == want.kv["bytes_allocated"]
    assert kept["kv_compression_ratio"] == 0 < pruned["kv_compression_ratio"]


def test_32_concurrent_clients(server, expected):
    time.sleep(1.5)  # gauges are published every 0.5 s: let the previous test's requests show as done
    assert metric(server, "kvzap_kv_blocks_used") == 0
    free_before = metric(server, "kvzap_kv_blocks_free")
    jobs = [(PROMPTS[(c + i) % len(PROMPTS)], 4 + (c % 3) * 3) for c in range(32) for i in range(4)]

    def client(c):
        return [generate(server, *jobs[c * 4 + i]) for i in range(4)]

    with ThreadPoolExecutor(32) as pool:
        results = [r for rs in pool.map(client, range(32)) for r in rs]
    assert [r.status_code for r in results] == [200] * 128
    for (prompt, n), r in zip(jobs, results):
        assert r.json()["text_output"] == expected(prompt, n)[0]
    time.sleep(1.5)  # gauges are published every 0.5 s
    assert metric(server, "kvzap_kv_blocks_free") == free_before
    assert metric(server, "kvzap_kv_blocks_used") == 0
    assert metric(server, "kvzap_running_batch") == 0 and metric(server, "kvzap_queue_length") == 0


def test_bad_requests_get_4xx_and_the_server_stays_ready(server):
    base = server["base"]
    long_prompt = "hello " * 9000
    cases = [
        (f"{base}/v2/models/ensemble/generate", {"max_tokens": 4}, "text_input"),
        (f"{base}/v2/models/ensemble/generate", {"text_input": "hi", "max_tokens": -3}, "max_tokens must be >= 1"),
        (f"{base}/v2/models/ensemble/generate", {"text_input": "hi", "max_tokens": 100000}, "exceeds the context limit"),
        (f"{base}/v2/models/ensemble/generate", {"text_input": "", "max_tokens": 4}, "text_input is empty"),
        (f"{base}/v2/models/ensemble/generate", {"text_input": long_prompt, "max_tokens": 4}, "exceeds the context limit"),
        (f"{base}/v2/models/ensemble/generate", {"text_input": PROMPTS[2] * 12, "max_tokens": 4}, "KV blocks; the pool has"),
        (f"{base}/v2/models/ensemble_stream/generate_stream", {"text_input": "", "max_tokens": 4, "stream": True}, "empty"),
        (f"{base}/v2/models/ensemble/generate", {"text_input": "hi", "max_tokens": 3, "sampling_param_max_tokens": 4},
         "max_tokens and sampling_param_max_tokens are the same parameter and disagree"),
        (f"{base}/v2/models/ensemble/generate", {"text_input": "hi", "sampling_param_max_tokens": 3,
                                                 "sampling_param_top_p": 1.5}, "top_p must be in"),
    ]
    for url, body, message in cases:
        r = requests.post(url, json=body, timeout=120)
        assert 400 <= r.status_code < 500 and message in r.text, (body.get("text_input", "")[:20], r.status_code, r.text)
    wrong_dtype = {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["hi"]},
                              {"name": "max_tokens", "shape": [1, 1], "datatype": "FP32", "data": [4.0]}]}
    r = requests.post(f"{base}/v2/models/ensemble/infer", json=wrong_dtype, timeout=60)
    assert r.status_code == 400 and "data-type" in r.text.lower().replace("datatype", "data-type")
    # Malformed JSON never reaches the model: tritonserver 2.51's HTTP frontend answers it, with 500
    # (upstream issue triton-inference-server/server#8762; 400 once fixed).
    r = requests.post(f"{base}/v2/models/ensemble/generate", data="{not json", timeout=60)
    assert r.status_code in (400, 500) and "failed to parse the request JSON buffer" in r.json()["error"]
    assert requests.get(f"{base}/v2/health/ready", timeout=10).status_code == 200
    assert generate(server, PROMPTS[0], 3).status_code == 200


def test_disconnect_returns_blocks_and_metrics(server):
    with requests.post(f"{server['base']}/v2/models/ensemble_stream/generate_stream", stream=True, timeout=60,
                       json={"text_input": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 3000, "stream": True}) as r:
        next(r.iter_lines())  # the first token arrived: the request is running
    free_before = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if metric(server, "kvzap_running_batch") == 0:
            free_before = metric(server, "kvzap_kv_blocks_free")
            break
    assert free_before is not None, "the disconnected request kept running"
    assert metric(server, "kvzap_kv_blocks_used") == 0
    assert metric(server, "kvzap_compression_ratio") == 0  # nothing running


def test_openai_door_shares_the_engine_with_triton(server, expected):
    import openai

    client = openai.OpenAI(base_url=server["openai"], api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == ["smollm2-135m"]
    text, kv = expected(PROMPTS[0], 10)
    c = client.completions.create(model="smollm2-135m", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert c.choices[0].text == text == generate(server, PROMPTS[0], 10).json()["text_output"]
    assert c.usage.model_extra["kv_bytes"] == kv["bytes_allocated"]
    chat = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi!"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 6
    # A long OpenAI stream shows in Triton's gauges (one engine, one KV pool); closing it frees its blocks.
    with client.completions.create(model="smollm2-135m", prompt="1, 2, 3, 4,", max_tokens=3000, temperature=0,
                                   stream=True) as stream:
        next(iter(stream))
        time.sleep(1.5)  # gauges are published every 0.5 s
        assert metric(server, "kvzap_running_batch") == 1 and metric(server, "kvzap_kv_blocks_used") > 0
    deadline = time.monotonic() + 30
    while metric(server, "kvzap_kv_blocks_used") > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert metric(server, "kvzap_kv_blocks_used") == 0 and metric(server, "kvzap_running_batch") == 0
    r = requests.post(f"{server['openai']}/chat/completions", json={"model": "smollm2-135m", "messages": [], "n": 2},
                      timeout=30)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert requests.get(f"{server['base']}/v2/health/ready", timeout=10).status_code == 200


def test_sigterm_leaves_no_process_behind(server):
    """Last in the module: SIGTERM to `kvzap-trt serve` stops tritonserver and every stub."""
    proc = server["proc"]
    tree = descendants(proc.pid)
    stubs = [p for p in tree if "triton_python_backend_stub" in open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")]
    assert len(stubs) >= 2, tree  # the front and the core model
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0, open(server["log"]).read()[-3000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in tree):
        time.sleep(0.2)
    left = [p for p in tree if os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"]
    assert not left, [open(f"/proc/{p}/cmdline", "rb").read() for p in left]
    log = open(server["log"]).read()
    # tritonserver unloaded both models in time: a cancelled stream (the disconnect test above) was
    # closed with the FINAL flag, else the decoupled model cannot unload and Triton's exit times out.
    assert "exited with failure" not in log, log[-3000:]
    assert "killed" not in log  # they ended by themselves, not by the reaper
