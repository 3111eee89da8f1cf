"""Errors the training loops raise to stop a run cleanly."""


class NonFiniteLossError(RuntimeError):
    """Raised instead of stepping on a NaN/inf loss; the last good checkpoint stays on disk."""
