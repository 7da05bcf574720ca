"""User-facing errors.

Every failure a user can cause (bad path, bad file, bad flag, bad weights) raises a subclass of
:class:`DsqError`. The CLI prints ``error: <message>`` on one line and exits with ``exit_code``.
Anything else is a bug (or an input dsq did not foresee): the CLI still prints one ``error:`` line
naming the exception and the input, exits 2, and shows the traceback only with ``--debug``.
"""

from __future__ import annotations


class DsqError(Exception):
    """An error caused by the input, with a message that says what to do."""

    exit_code = 2


class InputError(DsqError):
    """A path, file or checkpoint that cannot be used as given."""


class CorruptFileError(InputError):
    """A file whose bytes do not match its own header (truncated, hostile, or not that format)."""


class UnsupportedError(DsqError):
    """A valid input that dsq does not support (architecture, tensor, format)."""


class RecipeError(DsqError):
    """A recipe (preset name or TOML file) that cannot be applied."""


class BadWeightsError(DsqError):
    """NaN/Inf or otherwise unquantizable values, named by tensor and block."""


class OutputError(DsqError):
    """An output location that cannot be written (exists, not writable, disk full)."""
