"""The Hugging Face Hub: the local HF cache, ranged downloads, sha256 verification and
pulling files into the cache.

Rule: the only package that uses huggingface_hub / httpx. It deals in remote files
(repository, name, size, sha256) and knows nothing of the catalog, plans or runs.
May import the base layer only.
"""
