"""Exceptions that carry a message meant for a person: what went wrong, where, and the fix.

Every error medsight raises on purpose derives from :class:`MedsightError`; the CLI prints
its message on one line and exits with status 2, so nothing else (a traceback) is shown.
"""

from __future__ import annotations


class MedsightError(Exception):
    """Base class: the message names the thing at fault and how to fix it."""


class DataError(MedsightError):
    """A dataset, manifest or path cannot be used as given."""


class ImageDecodeError(DataError):
    """One image could not be decoded; ``source`` names it, ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class ConfigError(MedsightError):
    """A configuration value is missing, unknown or out of range."""


class TrainingError(MedsightError):
    """Training cannot go on (e.g. the loss became NaN); the message names the last checkpoint
    kept, or says there is none yet."""
