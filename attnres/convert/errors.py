"""The one error of :mod:`attnres.convert`."""

from __future__ import annotations


class ConvertError(ValueError):
    """A name map that does not fit the weights or the config: one line naming the layout and the first
    offending key. A ValueError raised by attnres, so the ``attnres`` command prints it as one line."""
