"""One registration point: adapters declare the classes they serve; loading and errors derive from it."""

from __future__ import annotations

from .base import Adapter

ADAPTERS: dict[str, type[Adapter]] = {}
_BY_CLASS: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator for an adapter; a second adapter claiming the same name or class raises."""
    if cls.name in ADAPTERS:
        raise ValueError(f"adapter {cls.name!r} registered twice ({ADAPTERS[cls.name].__module__} and {cls.__module__})")
    for arch in cls.architectures:
        if arch in _BY_CLASS:
            raise ValueError(f"class {arch!r} claimed by adapters {_BY_CLASS[arch].name!r} and {cls.name!r}")
        _BY_CLASS[arch] = cls
    ADAPTERS[cls.name] = cls
    return cls


def supported() -> dict[str, list[str]]:
    """Adapter name -> the HF/diffusers classes it serves (for docs and errors)."""
    _import_all()
    return {name: list(cls.architectures) for name, cls in sorted(ADAPTERS.items())}


def adapter_for(class_name: str) -> type[Adapter]:
    _import_all()
    if class_name in _BY_CLASS:
        return _BY_CLASS[class_name]
    listing = "; ".join(f"{n}: {', '.join(a)}" for n, a in supported().items())
    raise ValueError(
        f"unsupported architecture {class_name!r}. Supported: {listing}. To add it, write one file "
        "src/mmlens/models/<family>.py holding its name table (start from the nearest sibling listed in "
        "src/mmlens/models/README.md) and decorate its adapter with @register."
    )


def _import_all() -> None:
    from . import blip2, clip, llava, paligemma, pixart, qwen2_vl, sd3, sd_unet, siglip  # noqa: F401
