"""One adapter per model family: a small name table mapping canonical names onto HF/diffusers module paths."""

from .base import Adapter
from .registry import ADAPTERS, adapter_for, register, supported

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "register", "supported"]
