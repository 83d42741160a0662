"""Models: the catalog, registered (converted) builds, and resolving a reference such as
`mistral-small-3.2:Q4_K_M` to files on disk.

Rule: no network. May import the base layer, `hub` (a file's identity, where pulled
files lie) and `engine.types` (plain data); nothing above (no plan, runtime, chat, ui).
"""
