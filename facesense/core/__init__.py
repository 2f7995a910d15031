"""Shared by every lifecycle: config, model, checkpoints, runtime, data bridge, errors."""
