"""The error hierarchy.

Every error a user can cause is a `DeltahubError`. Its message names the bad value and
says how to fix it; the CLI prints it as one line and exits with `exit_code`.
"""

from __future__ import annotations


class DeltahubError(Exception):
    """Base class of every error deltahub raises on purpose."""

    exit_code = 1


class InvalidArtifact(DeltahubError):
    """An artifact broke a validation rule; `rule` names the rule."""

    exit_code = 3

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(f"invalid artifact [{rule}]: {message}")


class InvalidRef(DeltahubError):
    """A reference string is malformed."""

    exit_code = 2


class InvalidConfig(DeltahubError):
    """A configuration value is out of range or of the wrong type."""

    exit_code = 2


class NotFound(DeltahubError):
    """A name, version, tag, digest or file does not exist."""

    exit_code = 4


class AlreadyExists(DeltahubError):
    """Something immutable exists already (a published version)."""

    exit_code = 5


class IntegrityError(DeltahubError):
    """Stored or received bytes do not match their digest."""

    exit_code = 6


class IncompatibleBase(DeltahubError):
    """An adapter does not fit the base model it is loaded onto."""

    exit_code = 7


class Unsupported(DeltahubError):
    """A combination of options that deltahub does not support (or that has no meaning)."""

    exit_code = 8


class AuthError(DeltahubError):
    """Missing, invalid, revoked, expired or out-of-scope credentials."""

    exit_code = 9


class RemoteError(DeltahubError):
    """A remote hub answered with an error or could not be reached."""

    exit_code = 10


class StorageFull(DeltahubError):
    """The disk (or the registry database) has no room left for a write."""

    exit_code = 11


class ReadOnly(DeltahubError):
    """A write to a registry whose home is read-only."""

    exit_code = 12


class InUse(DeltahubError):
    """Removing something that another version still pins (a fusion's or merge's parent)."""

    exit_code = 13
