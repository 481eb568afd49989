"""The `mmlens` command: a thin shell over the library."""

from .main import app

__all__ = ["app"]
