"""Checks on a checkpoint folder before `from_pretrained` opens it.

mmlens reads weights from safetensors only: unpickling a `.bin`/`.pt`/`.ckpt` file can run any code the file's
author chose, so a pickle-only folder is refused here, by name, before transformers or diffusers could load it.
Configs and safetensors headers are checked too, so a bad file gets an error that names it instead of a
traceback from deep inside the loader. Only headers are read: weight files can be many GB.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CheckpointError, PickleWeightsError

# Weight files saved with pickle (torch.save): transformers, diffusers (incl. shards and variants), raw checkpoints.
PICKLE_PATTERNS = ("pytorch_model*.bin", "diffusion_pytorch_model*.bin", "*.bin.index.json", "*.ckpt", "*.pt",
                   "*.pth", "*.pkl")
MAX_HEADER = 100_000_000  # bytes; the safetensors library refuses larger headers too


def read_json(path: Path) -> Any:
    """The parsed JSON of `path`; a CheckpointError quoting the file and the parser's line/column if it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}; fix or re-save the file "
            "(save_pretrained writes it)"
        ) from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); it must be a JSON "
                              "file (save_pretrained writes it)") from None


def read_config(path: Path) -> dict:
    """`read_json` for a config file, which must hold a JSON object."""
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object ({{...}}); it holds a {type(cfg).__name__}")
    return cfg


def check_weights(folder: Path, saver: str = "model") -> None:
    """Refuse a folder whose weights are pickle only; validate every safetensors header and shard index in it.

    `saver` names the object whose `save_pretrained` converts the folder ("model", or "pipe" for a component).
    """
    safe_indexes = sorted(folder.glob("*.safetensors.index.json"))
    safe_files = sorted(folder.glob("*.safetensors"))
    if not safe_files and not safe_indexes:
        pickles = sorted({p for pattern in PICKLE_PATTERNS for p in folder.glob(pattern)})
        if pickles:
            others = f" (and {len(pickles) - 1} more pickle file(s))" if len(pickles) > 1 else ""
            raise PickleWeightsError(
                f"{pickles[0]}{others} holds pickle-format weights and {folder} has no .safetensors file. mmlens "
                "loads safetensors only, because unpickling a file can run arbitrary code. To convert, load the "
                f"checkpoint yourself in a trusted environment and call `{saver}.save_pretrained(folder)` "
                "(it writes safetensors by default), then pass that folder to mmlens.load."
            )
    for index in safe_indexes:
        weight_map = read_config(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' object (tensor name -> shard file); re-save the "
                                  "checkpoint with save_pretrained")
        for shard in sorted(set(map(str, weight_map.values()))):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{folder / shard} is missing: {index} lists it as a weight shard; copy "
                                        "every shard the index names into the folder")
    for path in safe_files:
        check_safetensors(path)


def check_safetensors(path: Path) -> None:
    """Validate a safetensors file from its header alone: an 8-byte little-endian header length N, N bytes of
    JSON, then the tensor data, whose last `data_offsets` end must land exactly on the end of the file."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid safetensors file: {why}. The file is truncated or corrupt; "
                               "copy it again or re-save the model with save_pretrained")

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"it holds {size} bytes, fewer than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise bad(f"its header length is {n} bytes, but the file holds {size} bytes (header limit {MAX_HEADER})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"its {n}-byte header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int and o >= 0 for o in offsets) and offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r} has no valid data_offsets [begin, end] (got {offsets!r})")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise bad(f"its header describes {8 + n + end} bytes (8 + {n} header + {end} data), but the file holds {size}")
