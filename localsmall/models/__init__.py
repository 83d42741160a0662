"""Models: the catalog, registered (converted) builds, and resolving a reference such as
`mistral-small-3.2:Q4_K_M` to files on disk.

Rule: no network. May import the base layer and `hub.cache` (where pulled files lie);
nothing above (no plan, runtime, chat, ui).
"""
