from kvzap_trt.runtime.engine import Engine, EvictionPolicy, Request
from kvzap_trt.runtime.sampler import SamplingParams, sample

__all__ = ["Engine", "EvictionPolicy", "Request", "SamplingParams", "sample"]
