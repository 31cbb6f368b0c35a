from kvzap_trt.runtime.engine import Engine, EvictionPolicy
from kvzap_trt.runtime.sampler import SamplingParams, sample
from kvzap_trt.runtime.scheduler import Request

__all__ = ["Engine", "EvictionPolicy", "Request", "SamplingParams", "sample"]
