"""The data floor's error type and the raise-or-skip policy every reader shares."""

from __future__ import annotations

import logging
from typing import Literal

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "skip")


class DataError(Exception):
    """A dataset on disk or a data setting is not what the data floor expects.

    The message always names the file, folder or setting at fault, so a user can fix it
    without reading the code.
    """


class ErrorPolicy:
    """Per-sample problems either stop the read ("raise") or are logged and counted ("skip").

    Structural problems (missing root, unreadable CSV header, unknown category) always raise:
    skipping them would silently read a different dataset from the one asked for.
    """

    def __init__(self, on_error: str, skipped: list[DataError] | None = None) -> None:
        if on_error not in ON_ERROR_CHOICES:
            raise DataError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        self.on_error = on_error
        # The caller may pass its own list so it can report the count after the read.
        self.skipped: list[DataError] = skipped if skipped is not None else []
        self._start = len(self.skipped)

    def handle(self, error: DataError) -> None:
        if self.on_error == "raise":
            raise error
        log.warning("skipping sample: %s", error)
        self.skipped.append(error)

    @property
    def count(self) -> int:
        return len(self.skipped) - self._start

    def report(self, what: str) -> int:
        """Log how many samples a read skipped; returns that count."""
        if self.count:
            log.warning("%s: skipped %d bad sample(s) (on_error=skip)", what, self.count)
        return self.count
