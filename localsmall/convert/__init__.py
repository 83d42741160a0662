"""`localsmall convert`: a safetensors checkpoint to the GGUF files llama.cpp runs,
quantized, then registered as a build.

Rule: may import the base layer, `engine` (kernels, the quantizer), `hub` (fetching a
checkpoint) and `models` (registering the result); prints nothing.
"""
