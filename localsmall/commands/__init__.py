"""One thin module per CLI command: validate flags, call the library, render."""
