"""The one error type the CLI turns into `error: ...` and a non-zero exit."""


class FaceSenseError(Exception):
    """A problem the user can fix (bad option, data, checkpoint); the message says how."""
