"""Built-in passes; each module registers one pass (or family) by name."""
