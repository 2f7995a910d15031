"""Augmentation engines: the spec (`spec.py`), the pure-torch reference that defines the result
(`reference.py`), the compiled CPU engine (`cpu_fused.py`) and the fused Triton kernel
(`triton_augment.py`). Import the module you need; this package imports nothing."""
