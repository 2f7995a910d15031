"""Training: the loop (loop.py) and what it needs: optimiser, run directory, memory check, progress."""
