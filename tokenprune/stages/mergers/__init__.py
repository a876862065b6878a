"""Built-in mergers."""
