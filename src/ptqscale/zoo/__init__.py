"""The reference model family (placeholder docstring, rewritten below)."""
