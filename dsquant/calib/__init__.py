"""Calibrated quantization (GPTQ, AWQ, imatrix-weighted RTN), run layer by layer on a calibration set.

``calibrate(checkpoint, plan, method, calib, samples, seqlen)`` returns HF-name -> QuantizedTensor (in
the plan's formats) plus rescaled float tensors (AWQ) and a report; ``quantize_checkpoint`` stores
those instead of its round-to-nearest results. One job per module: data (calibration sets and
sampling), pipeline (the sequential driver), methods (method table), gptq, awq, grid (format grids
and scale search; imatrix), moe_coverage (routed experts), resume (per-layer checkpoints).
"""
