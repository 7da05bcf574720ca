"""dsq's quantization core: formats, architecture tables, checkpoint I/O, recipes and plans."""
