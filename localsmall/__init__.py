"""localsmall: run Mistral Small 3.2 locally, with the right build for your machine."""

__version__ = "0.1.0"
