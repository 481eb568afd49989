"""One registration point: adapters declare the classes they serve; loading and errors derive from it.

Registration flows one way: each adapter module imports `register` from here and decorates its class;
`mmlens.models` (the package `__init__`) imports every adapter module. This module imports no adapter, so
importing it never cycles back into the adapters; the package is always initialised before any of its
submodules, so after any `import mmlens...` the table is full.
"""

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
    return {name: list(cls.architectures) for name, cls in sorted(ADAPTERS.items())}


def adapter_for(class_name: str) -> type[Adapter]:
    if class_name in _BY_CLASS:
        return _BY_CLASS[class_name]
    listing = "; ".join(f"{n}: {', '.join(a)}" for n, a in supported().items())
    raise ValueError(
        f"unsupported architecture {class_name!r}. Supported: {listing}. To add it, write one file "
        "src/mmlens/models/<family>.py holding its name table (start from the nearest sibling listed in "
        "src/mmlens/models/README.md), decorate its adapter with @register and import the module in "
        "src/mmlens/models/__init__.py."
    )

