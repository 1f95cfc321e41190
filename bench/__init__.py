"""queueformer's benchmark suite: `python -m bench` (or `make bench`) runs the CPU suite."""
