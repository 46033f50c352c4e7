"""The project's own exception: a problem with the user's data or setup."""


class StageError(RuntimeError):
    """A problem with the user's data or setup, reported as one clear line (no traceback)."""
