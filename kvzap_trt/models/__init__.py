from kvzap_trt.models.config import ModelConfig
from kvzap_trt.models.loading import LoadedModel, load_model, resolve_model_dir
from kvzap_trt.models.transformer import Transformer

__all__ = ["ModelConfig", "LoadedModel", "load_model", "resolve_model_dir", "Transformer"]
