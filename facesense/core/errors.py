"""The errors a user can cause, under one root (`FaceSenseError`, defined in pipeline so that the data
layer can raise it too); `facesense.cli.main` turns any of them into `error: ...` and a non-zero exit."""
from pipeline.errors import BadItem, FaceSenseError, PackError, ShardError

__all__ = ["BadItem", "FaceSenseError", "PackError", "ShardError"]
