"""Errors of the backends, in a module of their own so every submodule imports them directly."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the model and the reason."""


class GenerationStopped(RuntimeError):
    """``answer(..., stop=...)`` was told to stop (shutdown, a cancelled request) before it finished."""


class ServiceUnavailable(RuntimeError):
    """A remote backend (the atp-serve deployment) is down, unreachable or slower than its timeout.

    ``cause`` is the problem kind the node's diagnostics count it under.
    """

    cause = "service"


class BadInput(ValueError):
    """A frame, image or question that cannot be used: the input's fault, not the model's.

    ``cause`` is a short key (``encoding``, ``too_large``, ``query_empty``...) for counting and
    throttling; raised by the image decoder, the node's worker and the serving request checks.
    """

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause

    def __reduce__(self):  # pickled across processes (Ray) with its cause
        return type(self), (self.cause, str(self))
