"""Training shared by every trainer: the epoch loop, checkpoints and resume (loop.py), seeded batches (batches.py)."""
