"""Errors the library raises for bad user input (the CLI maps them to exit 2)."""

from __future__ import annotations


class InputError(Exception):
    """The request cannot be carried out as given (exit code 2)."""
