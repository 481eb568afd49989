"""One adapter per model family: a small name table mapping canonical names onto HF/diffusers module paths.

Importing this package imports every adapter module below; each registers itself with `@register`
(`registry.py` imports no adapter). A new family is one new module here plus its line in the import below.
"""

from . import blip2, clip, llava, paligemma, pixart, qwen2_vl, sd3, sd_unet, siglip  # noqa: F401  (registers each)
from .base import Adapter
from .registry import ADAPTERS, adapter_for, register, supported

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "register", "supported"]
