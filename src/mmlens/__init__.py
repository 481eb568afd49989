"""mmlens: mechanistic interpretability for multimodal foundation models, on the real HF/diffusers classes."""

from .hooks import ActivationCache, HookContext
from .hooks.steps import StepCache
from .hooks.tokens import TokenMap
from .lens import Lens
from .loading import load
from .models import supported

__version__ = "0.1.0"

__all__ = ["ActivationCache", "HookContext", "Lens", "StepCache", "TokenMap", "__version__", "load", "supported"]
