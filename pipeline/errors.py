"""Errors with messages meant for the user: one line naming the file/row and the fix."""


class PackError(Exception):
    """Bad input to `facesense pack`; nothing is written when it is raised."""


class BadItem(PackError):
    """One bad image or CSV row; `--skip-bad` records it instead of failing."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class ShardError(Exception):
    """A shard directory that is missing, corrupt, or of an unknown format version."""
