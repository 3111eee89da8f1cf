"""Errors the training loops raise to stop a run cleanly."""


class NonFiniteLossError(RuntimeError):
    """Raised instead of stepping on a NaN/inf loss; the last good checkpoint stays on disk."""


class NonFiniteGradientError(NonFiniteLossError):
    """Raised instead of stepping on a NaN/inf gradient (the loss itself may be finite)."""


class NonFiniteWeightsError(RuntimeError):
    """Raised instead of writing a checkpoint that holds NaN/inf weights over a good one."""
