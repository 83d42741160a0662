"""The engine: llama.cpp through llama-cpp-python's low-level API.

Rule: the only package that loads llama.cpp, and only lazily (inside functions or in
modules imported on demand), so that `localsmall --help` stays instant. May import the
base layer only.
"""
