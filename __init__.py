"""dsq: quantize and deploy distilled LLMs (FP8/int8/int4, GGUF and ONNX export, accuracy gates)."""

__version__ = "0.1.0"
