"""Planning: the hardware snapshot, the memory model, the pure planning rules and the
machine-facing planner that picks a build, a context and GPU layers.

Rule: decides, never downloads or loads. May import the base layer, `models` and
`engine.types` / `engine.devices` (device lists, lazily); nothing above.
"""
