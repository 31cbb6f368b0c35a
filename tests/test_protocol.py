"""Request parsing for the Triton model: what is accepted, and the 400s."""

from __future__ import annotations

import numpy as np
import pytest

from kvzap_trt.serve.protocol import OUTPUTS, BadRequest, output_arrays, parse_request


def request(**fields):
    arrays = {}
    for name, value in fields.items():
        if isinstance(value, np.ndarray):
            arrays[name] = value
        elif isinstance(value, str):
            arrays[name] = np.array([[value.encode()]], dtype=object)
        elif isinstance(value, bool):
            arrays[name] = np.array([[value]])
        elif isinstance(value, float):
            arrays[name] = np.array([[value]], dtype=np.float32)
        else:
            arrays[name] = np.array([[value]], dtype=np.int32)
    return arrays.get


def test_full_request():
    p = parse_request(request(text_input="hi there", max_tokens=7, temperature=0.5, top_p=0.9, top_k=4,
                              random_seed=np.array([[2**40]], dtype=np.uint64), stream=True,
                              stop_words=np.array([[b"\n", b"", b"END"]], dtype=object),
                              bad_words=np.array([[b""]], dtype=object)))
    assert (p.prompt, p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stream) == \
        ("hi there", 7, 0.5, pytest.approx(0.9), 4, 2**40, True)
    assert p.stop_words == ["\n", "END"]  # empty strings are no stop words (TRT-LLM clients send "")


def test_defaults_are_greedy_and_unstreamed():
    p = parse_request(request(text_input="x", max_tokens=1))
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.stop_words, p.stream) == (0.0, 1.0, 0, 0, [], False)
    assert (p.kv_coe, p.reasoning, p.evict) == (False, None, True)


def test_kv_coe_and_reasoning_inputs_and_outputs():
    """kvzap-trt's own inputs (kv_coe, reasoning) parse; their outputs are in a response only when
    given (JSON has no NaN)."""
    p = parse_request(request(text_input="x", max_tokens=1, kv_coe=True, reasoning="slow", evict=False))
    assert (p.kv_coe, p.reasoning, p.evict) == (True, "slow", False)
    asked = output_arrays("a", 0.5, 10, kv_coe_score=0.25, reasoning_used="fast")
    assert set(asked) == set(OUTPUTS)
    assert (asked["kv_coe_score"][0, 0], asked["reasoning_used"][0, 0]) == (np.float32(0.25), b"fast")
    plain = output_arrays("a", 0.5, 10)
    assert set(plain) == set(OUTPUTS) - {"kv_coe_score", "reasoning_used"}


@pytest.mark.parametrize("fields,message", [
    ({"max_tokens": 3}, "'text_input' is required"),
    ({"text_input": "x"}, r"'max_tokens' \(or 'sampling_param_max_tokens'\) is required"),
    ({"text_input": "   ", "max_tokens": 3}, "text_input is empty"),
    ({"text_input": "x", "max_tokens": 0}, "max_tokens must be >= 1"),
    ({"text_input": "x", "max_tokens": -5}, "max_tokens must be >= 1"),
    ({"text_input": "x", "max_tokens": 3, "temperature": -1.0}, "temperature must be"),
    ({"text_input": "x", "max_tokens": 3, "temperature": float("nan")}, "temperature must be"),
    ({"text_input": "x", "max_tokens": 3, "top_p": 1.5}, "top_p must be in"),
    ({"text_input": "x", "max_tokens": 3, "top_k": -1}, "top_k must be"),
    ({"text_input": "x", "max_tokens": 3, "bad_words": "foo"}, "bad_words is not supported"),
    ({"text_input": "x", "max_tokens": 3, "reasoning": "medium"}, "reasoning must be one of auto, fast, slow"),
    ({"text_input": np.array([[b"a"], [b"b"]], dtype=object), "max_tokens": 3}, "one prompt per request"),
])
def test_bad_requests(fields, message):
    with pytest.raises(BadRequest, match=message):
        parse_request(request(**fields))


def test_llmapi_names_map_to_the_same_parameters():
    """TensorRT-LLM's llmapi model's inputs, alone or beside equal ensemble inputs."""
    fields = dict(text_input="hi", sampling_param_max_tokens=7, sampling_param_temperature=0.5,
                  sampling_param_top_p=0.75, sampling_param_top_k=4, streaming=True,
                  sampling_param_seed=np.array([[2**40]], dtype=np.uint64),
                  sampling_param_stop=np.array([[b"\n", b"END"]], dtype=object),
                  sampling_param_exclude_input_from_output=True)
    p = parse_request(request(**fields))
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop_words, p.stream) == \
        (7, 0.5, 0.75, 4, 2**40, ["\n", "END"], True)
    both = parse_request(request(**fields, max_tokens=7, temperature=0.5, top_p=0.75, top_k=4, stream=True,
                                 random_seed=np.array([[2**40]], dtype=np.uint64),
                                 stop_words=np.array([[b"\n", b"END"]], dtype=object)))
    assert both == p


@pytest.mark.parametrize("fields,message", [
    ({"max_tokens": 3, "sampling_param_max_tokens": 4}, r"max_tokens and sampling_param_max_tokens are the same parameter and disagree \(\[3\] vs \[4\]\)"),
    ({"max_tokens": 3, "temperature": 0.5, "sampling_param_temperature": 0.7}, "temperature and sampling_param_temperature"),
    ({"max_tokens": 3, "top_p": 0.5, "sampling_param_top_p": 0.7}, "top_p and sampling_param_top_p"),
    ({"max_tokens": 3, "top_k": 1, "sampling_param_top_k": 2}, "top_k and sampling_param_top_k"),
    ({"max_tokens": 3, "random_seed": 1, "sampling_param_seed": 2}, "random_seed and sampling_param_seed"),
    ({"max_tokens": 3, "stream": True, "streaming": False}, "stream and streaming"),
    ({"max_tokens": 3, "stop_words": "a", "sampling_param_stop": "b"}, "stop_words and sampling_param_stop"),
    ({"sampling_param_max_tokens": 0}, "max_tokens must be >= 1"),
    ({"sampling_param_max_tokens": 3, "sampling_param_top_p": 2.0}, "top_p must be in"),
    ({"sampling_param_max_tokens": 3, "sampling_param_exclude_input_from_output": False}, "never echoed"),
])
def test_llmapi_names_disagreeing_or_bad(fields, message):
    with pytest.raises(BadRequest, match=message):
        parse_request(request(text_input="x", **fields))
