"""The hook layer: canonical names resolved to live modules, hooks that live exactly as long as a `with` block."""

from .cache import ActivationCache
from .context import HookContext
from .sites import Row, Site

__all__ = ["ActivationCache", "HookContext", "Row", "Site"]
