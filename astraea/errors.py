"""Errors that mean the same thing in every service."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request (or one element of a batch) failed validation. The message names the field
    (and index), the value and what is allowed; a service answers it with INVALID_ARGUMENT
    and applies nothing of the request."""
