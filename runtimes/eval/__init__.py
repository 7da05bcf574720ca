"""``dsq eval``: a quantized model on its runtime against the reference model (PPL, KL divergence, top-1
agreement, reasoning answers) and its reports. It lives beside the runtimes it drives; ``dsquant`` (the
quantization core) imports neither (tests/test_layering.py)."""
