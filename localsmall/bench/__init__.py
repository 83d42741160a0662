"""`localsmall bench`: speed measured the way llama.cpp's llama-bench does, and the
quality cost of each quant the way llama-perplexity measures it.

Rule: measures through `runtime` (it starts engines like chat and run do); prints
nothing (`ui.bench_view` shows the report).
"""
