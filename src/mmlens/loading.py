"""`mmlens.load`: a local folder or a loaded object -> Lens, through the real `from_pretrained`.

Weights come from safetensors only (`use_safetensors=True` on every `from_pretrained`, and `checkpoints` refuses
pickle-only folders first): mmlens never unpickles, since a pickle can run arbitrary code when loaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import check_weights, read_config
from .errors import CheckpointError
from .lens import Lens
from .models.registry import adapter_for

log = logging.getLogger(__name__)


def _class_of_folder(folder: Path) -> tuple[str, str]:
    """('transformers' | 'diffusers', class name) from config.json / model_index.json."""
    index = folder / "model_index.json"
    if index.exists():
        name = read_config(index).get("_class_name")
        if not isinstance(name, str):
            raise CheckpointError(f"{index} has no '_class_name' string (the diffusers pipeline class, e.g. "
                                  f"\"StableDiffusionPipeline\"); got {name!r}. Re-save the pipeline with "
                                  "save_pretrained")
        return "diffusers", name
    config = folder / "config.json"
    if not config.exists():
        raise FileNotFoundError(
            f"{folder} holds neither config.json (transformers) nor model_index.json (diffusers pipeline)"
        )
    cfg = read_config(config)
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"{config}: 'architectures' must be a list of class names, e.g. [\"CLIPModel\"]; "
                              f"got {archs!r}")
    if archs:
        return "transformers", archs[0]
    if "_class_name" in cfg:
        return "diffusers", cfg["_class_name"]
    raise ValueError(f"{config} names no architecture (no 'architectures' field); load the model yourself and "
                     "pass the object to mmlens.load")


def _load_processor(folder: Path):
    """The folder's processor, else its tokenizer / image processor; None when it has none that loads."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    for loader in (AutoProcessor, AutoTokenizer, AutoImageProcessor):
        try:
            return loader.from_pretrained(folder)
        except Exception as err:  # noqa: BLE001  a missing processor is normal for bare checkpoints
            log.debug("%s could not load from %s: %s", loader.__name__, folder, err)
    return None


def _load_pipeline(folder: Path, class_name: str, kwargs: dict):
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"diffusers has no pipeline class {class_name!r} (model_index.json in {folder})")
    index = read_config(folder / "model_index.json")
    for comp, spec in index.items():
        if comp.startswith("_") or not isinstance(spec, list) or not spec:
            continue
        if spec[0] is None:  # components saved as None (e.g. SD3 without T5) must be passed as None
            kwargs.setdefault(comp, None)
        elif comp not in kwargs and (folder / comp).is_dir():  # loaded from its subfolder: check it first
            if (folder / comp / "config.json").exists():
                read_config(folder / comp / "config.json")
            check_weights(folder / comp, saver="pipe")
    return cls.from_pretrained(folder, **kwargs)


def _diffusers_takes_dtype() -> bool:
    """diffusers renamed `torch_dtype` to `dtype`; older versions know only `torch_dtype`."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return False
    return True


def load(path_or_model: str | os.PathLike | Any, processor: Any = None, *, device: str | Any = None,
         **kwargs) -> Lens:
    """Load a supported model or pipeline from a local folder, or wrap one already loaded.

    `device` ("cuda", "cuda:1", ...) moves the loaded model or whole pipeline there. Other keyword arguments go to
    `from_pretrained` (`dtype`, `device_map="auto"`, `attn_implementation`, ...); `dtype` and `torch_dtype` are the
    same for transformers models and diffusers pipelines. Nothing is downloaded: pass a local folder. Weights load
    from safetensors only.
    """
    if device is not None and "device_map" in kwargs:
        raise ValueError("pass device= or device_map=, not both (device_map places the model while loading)")
    lens = _load(path_or_model, processor, kwargs)
    if device is not None:
        lens.model.to(device)
    return lens


def _load(path_or_model: str | os.PathLike | Any, processor: Any, kwargs: dict) -> Lens:
    if isinstance(path_or_model, (str, os.PathLike)):
        safe = kwargs.pop("use_safetensors", None)
        if safe is not None and safe is not True:
            raise ValueError(f"use_safetensors={safe!r} is not allowed: mmlens loads safetensors weights only and "
                             "never unpickles. Leave it out; to convert a .bin checkpoint, load it yourself in a "
                             "trusted environment and save_pretrained(folder)")
        kwargs["use_safetensors"] = True
        folder = Path(path_or_model)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder; mmlens loads local checkpoints only (no hub access)")
        lib, class_name = _class_of_folder(folder)
        adapter_cls = adapter_for(class_name)
        if "dtype" in kwargs and "torch_dtype" in kwargs:
            raise ValueError("pass dtype= or torch_dtype=, not both (they are the same)")
        want, other = ("dtype", "torch_dtype") if lib == "transformers" or _diffusers_takes_dtype() else \
            ("torch_dtype", "dtype")
        if other in kwargs:  # the installed library's name for it
            kwargs[want] = kwargs.pop(other)
        if isinstance(kwargs.get(want), str) and kwargs[want] != "auto":  # diffusers ignores a name: a torch dtype
            name = kwargs[want].replace("torch.", "")
            if not isinstance(getattr(torch, name, None), torch.dtype):
                raise ValueError(f"dtype={kwargs[want]!r}: not a torch dtype name (e.g. 'bfloat16', 'float16', "
                                 "'float32') or 'auto'")
            kwargs[want] = getattr(torch, name)
        if lib == "diffusers":
            model = _load_pipeline(folder, class_name, dict(kwargs))
        else:
            import transformers

            cls = getattr(transformers, class_name)
            check_weights(folder)
            model = cls.from_pretrained(folder, **kwargs)
            model.eval()
            if processor is None:
                processor = _load_processor(folder)
        return Lens(model, adapter_cls(model), processor)
    if kwargs:
        raise TypeError(f"keyword arguments {sorted(kwargs)} go to from_pretrained; the model is already loaded")
    model = path_or_model
    if not isinstance(model, nn.Module) and not hasattr(model, "components"):
        raise TypeError(f"expected a folder path, a transformers model or a diffusers pipeline; got {type(model).__name__}")
    adapter_cls = adapter_for(type(model).__name__)
    return Lens(model, adapter_cls(model), processor)
