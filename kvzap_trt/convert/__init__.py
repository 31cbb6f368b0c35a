"""HF model + KVzap surrogate -> TensorRT-LLM checkpoint (`kvzap-trt convert`), and back."""
