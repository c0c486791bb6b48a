"""Errors a user can act on.

Every error raised for bad input (a wrong path, schema, column, artifact) is a `DomaintokError`: the CLI prints
its message as one line and exits 2, and services route the offending input to dead-letter with it as reason.
"""

from __future__ import annotations


class DomaintokError(ValueError):
    """Bad input or configuration, described in one line that names what is wrong."""


class SchemaError(DomaintokError):
    """A domain schema that cannot be used (unknown field type, missing source, duplicate name, ...)."""


class ArtifactError(DomaintokError):
    """A tokenizer or model directory that is missing, unsafe (pickle) or incompatible (fingerprint mismatch)."""


class EventError(DomaintokError):
    """One event that cannot be tokenized (malformed, wrong types); routed to dead-letter, never a crash."""
