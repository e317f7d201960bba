"""Errors a person can act on.

Every refusal in sis-ingest is one of these, carrying a single line that says what was wrong
and what is accepted. Command-line entry points print ``str(error)`` and exit with
``error.exit_code``; they never print a traceback for these.
"""

from __future__ import annotations


class IngestError(Exception):
    """A refusal or failure with a one-line message for a person."""

    exit_code = 1


class ConfigError(IngestError):
    """The configuration file or a setting in it is wrong."""

    exit_code = 2


class NotFound(IngestError):
    """The named account, key, address or other thing does not exist."""


class Refused(IngestError):
    """The input breaks a rule (key policy, IP policy, naming...)."""
