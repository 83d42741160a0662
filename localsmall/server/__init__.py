"""`localsmall serve`: an OpenAI-compatible HTTP API over a loaded engine.

The package is the library side of the command: request parsing and validation
(`requests`), messages and images to a prompt (`prompting`, `image_urls`), the warm
conversations kept in the KV cache (`slots`), the queue and the one decode at a time
(`scheduler`), the OpenAI response shapes (`responses`), the ASGI app (`app`) and
running it under uvicorn (`runner`). Nothing here prints: the command shows what
happens through ui/serve_view.py.

Rule: prints nothing. May import the base layer, `engine` and `chat` (prompts); never
`runtime`, `commands` or `ui`. Besides `hub`, the one package that speaks HTTP:
starlette/uvicorn to serve, httpx2 only to fetch `image_url`s.
"""
