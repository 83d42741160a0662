"""From a command's options to a running model: the build to run (planned for this
machine), pulled if the user accepts, loaded into an engine, and a chat session on it.

Rule: the one place the pipeline's stages meet. May import every library package
(models, hub, plan, engine, chat) and the base layer; never `commands` or `ui`.
"""
