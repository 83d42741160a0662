"""`localsmall bench`: speed measured the way llama.cpp's llama-bench does, and the
quality cost of each quant the way llama-perplexity measures it."""
