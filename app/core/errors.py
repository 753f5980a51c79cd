"""Typed errors of the domain.

Each carries a message a person can act on. The API maps them to HTTP status codes in
one place (``app.api.errors``); the CLI prints the message and exits non-zero.
"""

from __future__ import annotations


class SagellmError(Exception):
    """Base of every error the control plane raises on purpose."""

    status_code = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"error": type(self).__name__, "message": self.message}
        if self.field:
            out["field"] = self.field
        return out


class ConfigError(SagellmError):
    """A setting (environment variable) has an invalid value."""

    status_code = 500


class ValidationError(SagellmError):
    """A request or spec field is invalid; nothing was started or reserved."""

    status_code = 400


class UnknownPolicyError(ValidationError):
    """A placement or balancing policy name that is not registered."""


class NotFoundError(SagellmError):
    status_code = 404


class PlacementError(SagellmError):
    """Nothing fits. ``reasons`` lists, per host and GPU, why it was rejected."""

    status_code = 409

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        self.reasons = list(reasons or [])
        self.summary = message  # without the reasons
        full = message if not self.reasons else message + ":\n  " + "\n  ".join(self.reasons)
        super().__init__(full)

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        out["reasons"] = self.reasons
        return out


class ReservationConflict(SagellmError):
    """The ledger refused a reservation (a concurrent one took the room or the port)."""

    status_code = 409


class IllegalTransition(SagellmError):
    """An engine state change that the state machine forbids: a bug, never overwritten."""

    status_code = 409


class NoWorkerError(SagellmError):
    """No host worker is alive to do the work."""

    status_code = 503


class StateLostError(SagellmError):
    """The state store lost a record while a request was using it (Redis was flushed
    or restarted without its data); the request can be sent again."""

    status_code = 503
