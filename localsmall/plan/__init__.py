"""Planning: the hardware snapshot, the memory model, the pure planning rules, the
machine-facing planner that picks a build, a context and GPU layers, and `doctor`.

Rule: decides, never downloads or loads. May import the base layer, `models`, `hub.cache`
(free disk) and `engine` only for plain types and device lists (lazily); nothing above.
"""
