"""One thin module per CLI command: validate flags, call the library, render.

Rule: the only package that uses Typer; shared flags are declared once in `options`.
Heavy library imports stay inside the command functions, so `localsmall --help` is instant.
"""
