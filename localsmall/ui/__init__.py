"""Everything the user sees: Rich rendering and prompt_toolkit input live in this package
and nowhere else."""
