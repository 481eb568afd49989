"""One protocol for every technique's output: a dataclass that saves, loads, plots and renders in Jupyter.

    res = mmlens.methods.logit_lens(lens, inputs)
    res.save("out/logit_lens")                       # result.json (class tag, meta, plain fields) + tensors.safetensors
    same = Result.load("out/logit_lens")             # the same class, the same values
    res.plot()                                       # a matplotlib Figure
    res                                              # in Jupyter: a summary and the figure

Subclasses are dataclasses whose fields are tensors (stored in safetensors) or JSON values (stored in result.json).
A field named `meta` holds the provenance (`provenance(lens, names)`). Loading refuses unknown classes and unknown
or missing fields rather than dropping them.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..io import atomic_path, atomic_write_text
from ..viz.report import figure_png

RESULT_FILE = "result.json"
TENSORS_FILE = "tensors.safetensors"
_CLASSES: dict[str, type[Result]] = {}


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_pair(json_path: Path, tensors_path: Path, digest: str | None) -> None:
    """The JSON names the hash of the tensors written with it: a save interrupted between the two files (new
    tensors, old JSON) is refused instead of loading a mixture."""
    if digest is not None and file_sha256(tensors_path) != digest:
        raise ValueError(f"{tensors_path} does not match {json_path} (a save was interrupted between the two files?); "
                         "save again")


def provenance(lens, names: list[str] | None = None, **extra) -> dict:
    """What produced a result: mmlens version, architecture, model class and path, the hook points used."""
    from .. import __version__

    model = lens.model
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return {"mmlens": __version__, "architecture": lens.architecture, "family": lens.family,
            "model_class": type(model).__name__, "model_path": str(path) if path else None,
            "names": list(names or []), **extra}


WORD_STARTS = ("\u2581", "\u0120", "")  # SentencePiece "▁word", byte-level BPE "Ġword", a word-level vocabulary


def token_id(token: str | int, vocab) -> int:
    """The id of a word given as a string: its word-initial piece where the vocabulary marks one (`▁red`, `Ġred`),
    else the exact entry; `vocab` is a list (id -> string) or a dict (string -> id). Ints pass through."""
    if isinstance(token, int):
        return token
    lookup = vocab if isinstance(vocab, dict) else {t: i for i, t in enumerate(vocab)}
    for start in WORD_STARTS:
        if start + token in lookup:
            return int(lookup[start + token])
    raise ValueError(f"token {token!r} is not in the vocabulary (tried {[s + token for s in WORD_STARTS]}); pass its id")


def require_family(lens, families: tuple[str, ...] | str, technique: str) -> None:
    families = (families,) if isinstance(families, str) else families
    if lens.family not in families:
        raise TypeError(f"{technique} applies to {' and '.join(families)} models; {lens.architecture} is a "
                        f"{lens.family} model")


@dataclasses.dataclass
class Result:
    """Base of every technique's result. `meta`: provenance (see `provenance`)."""

    meta: dict

    tag: ClassVar[str] = "Result"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.tag = f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
        _CLASSES[cls.tag] = cls

    # ----------------------------------------------------------------------------------------- persistence
    def save(self, folder: str | os.PathLike) -> Path:
        """`folder/result.json` and `folder/tensors.safetensors`, each written atomically (the JSON last)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors, plain = {}, {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                tensors[f.name] = value.detach().cpu().contiguous()
            else:
                plain[f.name] = value
        with atomic_path(folder / TENSORS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "mmlens.Result", "class": self.tag})
        doc = {"class": self.tag, "tensors": sorted(tensors), "sha256": file_sha256(folder / TENSORS_FILE),
               "fields": plain}
        atomic_write_text(folder / RESULT_FILE, json.dumps(doc, indent=1, default=_json_default))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Result:
        """The saved result, as its own class (`Result.load` works for any; `LogitLensResult.load` checks it)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        path = folder / RESULT_FILE
        if not path.exists():
            raise FileNotFoundError(f"{folder} holds no {RESULT_FILE}: not a folder written by Result.save")
        doc = json.loads(path.read_text())
        target = _CLASSES.get(doc.get("class"))
        if target is None:
            raise ValueError(f"{path}: unknown result class {doc.get('class')!r}; known: {sorted(_CLASSES)} "
                             "(import the module that defines it first)")
        if not issubclass(target, cls):
            raise ValueError(f"{path} holds a {target.__name__}, not a {cls.__name__}; use Result.load")
        check_pair(path, folder / TENSORS_FILE, doc.get("sha256"))
        tensors = load_file(str(folder / TENSORS_FILE))
        values = {**doc["fields"], **{k: tensors[k] for k in doc["tensors"]}}
        names = {f.name for f in dataclasses.fields(target)}
        if set(values) != names:
            raise ValueError(f"{path}: fields {sorted(set(values) ^ names)} do not match {target.__name__}'s "
                             f"{sorted(names)} (saved by another version?)")
        return target(**values)

    # --------------------------------------------------------------------------------------------- display
    def plot(self, **kw):
        """A matplotlib Figure of the result (each technique defines its own)."""
        raise NotImplementedError(f"{type(self).__name__} defines no plot")

    def summary(self) -> str:
        """One line saying what the result holds."""
        shapes = ", ".join(f"{f.name} {tuple(getattr(self, f.name).shape)}" for f in dataclasses.fields(self)
                           if isinstance(getattr(self, f.name), torch.Tensor))
        return f"{type(self).__name__}({self.meta.get('architecture', '?')}: {shapes})"

    def __repr__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        img = ""
        try:
            img = f"<img src='{figure_png(self.plot())}'/>"
        except NotImplementedError:
            pass
        return f"<div><b>{html.escape(self.summary())}</b><br/>{img}</div>"

    def to_report(self, report, title: str | None = None, **plot_kw) -> None:
        """A section of an mmlens HTML report (`viz.report.Report`): heading, summary and `plot(**plot_kw)`."""
        report.heading(title or type(self).__name__, level=3)
        report.text(self.summary())
        report.figure(self.plot(**plot_kw), title or "")


def _json_default(x: Any):
    if isinstance(x, (tuple, set)):
        return list(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"cannot save {type(x).__name__} in a result's JSON; make it a tensor, list, dict, str or number")
