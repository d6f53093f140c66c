"""Pure tensor math (no module walking, no I/O): quantization, GPTQ, pruning, and the other methods."""
