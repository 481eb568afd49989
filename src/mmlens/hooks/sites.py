"""Rows of an adapter's name table and their expansion into concrete sites on a live model.

A `Row` is a template: `vision.blocks.{i}.resid_post` is read from the output of `encoder.layers.{i}`.
`expand` scans `named_modules()` once and yields one `Site` per module that matches, so a table never
needs to know how many layers a checkpoint has, and every listed name is backed by a live module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

READS = ("out", "in", "pattern")


@dataclass(frozen=True)
class Row:
    """One line of a name table.

    name: canonical template, placeholders in braces (`lm.blocks.{i}.attn.z`).
    path: module path template in the HF/diffusers model (`model.language_model.layers.{i}.self_attn.o_proj`).
    read: `out` (module output), `in` (module input `hidden_states`, positional 0 or keyword) or
        `pattern` (attention probabilities of an attention module, computed at its kernel).
    pick: which element of a tuple/ModelOutput output to read (`0`, or a field name such as `logits`).
    heads: split the last dim into `(heads, d_head)` (`q`, `k`, `v`, `z`).
    part: `(k, n)` reads the k-th of n equal slices of the last dim (fused qkv projections).
    layout: the documented layout of the value, for docs and shape tests.
    """

    name: str
    path: str
    read: str = "out"
    pick: int | str | None = 0
    heads: bool = False
    part: tuple[int, int] | None = None
    layout: str = ""

    def __post_init__(self):
        if self.read not in READS:
            raise ValueError(f"Row {self.name!r}: read={self.read!r}; allowed: {READS}")

    def rooted(self, name_prefix: str, path_prefix: str) -> Row:
        """The same row under another tower prefix and module root (tables compose by prefix)."""
        path = ".".join(p for p in (path_prefix, self.path) if p)
        return Row(name_prefix + self.name, path, self.read, self.pick, self.heads, self.part, self.layout)


@dataclass(frozen=True)
class Site:
    """A row made concrete: one canonical name bound to one live module."""

    name: str
    path: str
    module: nn.Module = field(repr=False, compare=False)
    row: Row = field(repr=False)
    head_dim: int | None = None


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _template_regex(template: str) -> re.Pattern:
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>\\d+)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(out) + "$")


def head_dim_of(modules: dict[str, nn.Module], path: str) -> int:
    """Per-head width, read from the nearest ancestor attention module of `path`."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        mod = modules.get(".".join(parts[:cut]))
        if mod is None:
            continue
        if not isinstance(getattr(mod, "heads", None), int) and isinstance(getattr(mod, "attention", None), nn.Module):
            mod = mod.attention  # BERT-style wrappers (Q-Former): the heads live one level down
        for attr in ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim"):
            val = getattr(mod, attr, None)
            if isinstance(val, int):
                return val
        heads = getattr(mod, "heads", None)  # diffusers Attention
        inner = getattr(mod, "inner_dim", None)
        if isinstance(heads, int) and isinstance(inner, int):
            return inner // heads
    raise ValueError(f"cannot find the head width of {path!r}: no ancestor module has head_dim/attention_head_size")


def expand(rows: list[Row], model: nn.Module) -> dict[str, Site]:
    """Bind every row to the live modules it names; rows that match nothing are simply absent."""
    modules = dict(model.named_modules())
    sites: dict[str, Site] = {}
    for row in rows:
        if "{" not in row.path:
            matches = [(row.path, {})] if row.path in modules else []
        else:
            rx = _template_regex(row.path)
            matches = [(p, m.groupdict()) for p in modules if (m := rx.match(p))]
        for path, groups in matches:
            name = row.name.format(**groups)
            if name in sites:
                raise ValueError(f"name table defines {name!r} twice ({sites[name].path!r} and {path!r})")
            hd = head_dim_of(modules, path) if row.heads else None
            sites[name] = Site(name, path, modules[path], row, hd)
    return sites


def unbound_rows(rows: list[Row], sites: dict[str, Site]) -> list[Row]:
    """The rows of `rows` that produced no site in `sites` (an `expand` result), in table order.

    `expand` drops such rows silently, since a table lists modules that only some checkpoints of a family have;
    tests use this to check that every row binds on at least one model, so a misspelt path cannot hide.
    """
    bound = {site.row for site in sites.values()}  # rows are frozen dataclasses: equal rows bind alike
    return [row for row in rows if row not in bound]
