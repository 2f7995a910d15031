"""Data: FER2013 sources -> HDF5 shards -> loaders that feed training."""
