"""The one error type the converter raises for bad inputs."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint could not be converted; the message names the file or key, what was found,
    what was expected and what to change."""
