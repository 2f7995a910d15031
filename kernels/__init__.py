"""Augmentation engines: the pure-torch reference (the spec) and the fused Triton kernel."""
from kernels.reference import augment_reference
from kernels.spec import AugConfig, AugParams, OutputSpec, erase_box, identity_params, sample_params

__all__ = ["AugConfig", "AugParams", "OutputSpec", "augment_reference", "erase_box",
           "identity_params", "sample_params"]
