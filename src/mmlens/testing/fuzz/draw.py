"""Drawing a case: every argument of a call, valid or invalid, from its typed pool.

`DrawMixin.case(seed)` is a pure function of the seed (one `random.Random(seed)`, drawn in a fixed order); what the
drawn arguments mean together is then settled by `settle.settle`. Mixed into `Fuzzer` (fuzzer.py), which gives it
`p_invalid`, `archs` and `info(arch, variant)`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import random
import re

import torch

from .cases import BAD_RETURNS, DIFFUSION, ENTRIES, PATTERN_EDITS, PROMPT, VARIANTS, Arg, Case, hook_items, omitted
from .resolve import _Bad, resolve, resolve_names
from .settle import settle


class DrawMixin:
    """Drawing cases (mixed into Fuzzer): `case(seed)`, then one `_draw_*` per argument."""

    def case(self, seed: int) -> Case:
        """The case of `seed` (deterministic)."""
        rng = random.Random(seed)
        arch = rng.choice(self.archs)
        diff = arch in DIFFUSION
        entry = rng.choices(*ENTRIES[diff])[0]
        variant = rng.choice(VARIANTS[diff])
        info = self.info(arch, variant)
        a: dict[str, Arg] = {}
        if entry == "generate" and not diff:
            a["entry"] = Arg("generate_on_" + arch, valid=False, culprits=("generate",))
        a["inputs"] = self._draw_inputs(rng, info, entry)
        if entry != "hooks":
            a["names"] = self._draw_names(rng, info)
        a["hooks"] = self._draw_hooks(rng, info, entry)
        if entry == "run_with_cache":
            a["grad"] = self._draw_grad(rng)
        # grad=True refuses cache options and selections: mostly leave them out, so gradients get checked
        plain = "grad" in a and a["grad"].spec is True and rng.random() < 0.8
        involved = self._involved_patterns(info, a)
        edited = self._edited_patterns(info, a)
        for arg, dim in (("attn_rows", 2), ("attn_heads", 1)):
            a[arg] = omitted(arg) if plain else self._draw_sel(rng, info, arg, involved, dim, edited)
        if entry in ("generate", "hooks") or not diff:
            a["steps"] = self._draw_steps(rng, info, entry, "steps")
            a["record_steps"] = self._draw_steps(rng, info, entry, "record_steps")
        if entry == "hooks":
            a["guidance"] = self._draw_guidance(rng, diff)
        if entry != "hooks":
            a["cache_dtype"] = omitted("cache_dtype") if plain else self._draw_dtype(rng)
            a["cache_device"] = omitted("cache_device") if plain else self._draw_device(rng)
        if entry == "generate" and diff:
            a["progress"] = self._pick(rng, valid=[("False", False)],
                                       invalid=[("str", "no"), ("int", 0), ("None", None)], arg="progress", p_omit=0.0)
        a["extra"] = self._draw_extra(rng, entry, diff)
        case = Case(seed, arch, entry, variant, a)
        settle(case, info)
        return case

    def _pick(self, rng, valid, invalid, arg, p_omit=0.5, culprits=None):
        if invalid and rng.random() < self.p_invalid:
            label, value = rng.choice(invalid)
            return Arg(f"{arg}:{label}", value, valid=False, culprits=culprits or (arg,))
        if rng.random() < p_omit:
            return omitted(arg)
        label, value = rng.choice(valid)
        return Arg(f"{arg}:{label}", value)

    def _draw_inputs(self, rng, info, entry) -> Arg:
        diff = info.arch in DIFFUSION
        if diff:
            valid = [("str", {"prompt": PROMPT}), ("list", {"prompt": [PROMPT]})]
            invalid = [("prompt_int", {"prompt": 5}, ("prompt",)), ("no_prompt", {"prompt": None}, ("prompt",)),
                       ("height_33", {"height": 33}, ("height",)),
                       ("steps_0", {"num_inference_steps": 0}, ("num_inference_steps",)),
                       ("steps_float", {"num_inference_steps": 2.5}, ("num_inference_steps",)),
                       ("steps_str", {"num_inference_steps": "2"}, ("num_inference_steps",))]
        else:
            valid = [("dict", "dict")] * 3 + ([("kwargs", "kwargs")] if entry == "run_with_cache" else [])
            invalid = [("pil", "pil", ("inputs",)), ("str", "str", ("inputs",)), ("tensor", "tensor", ("inputs",)),
                       ("lists", "lists", ("return_tensors",)), ("ndarray_pixels", "ndarray", ("pixel_values",)),
                       ("mask_mismatch", "mask", ("attention_mask",))]
            if info.arch in ("clip", "siglip"):
                invalid += [("images_only", "images_only", ("input_ids",)),
                            ("text_only", "no_pixels", ("pixel_values",))]
            else:
                invalid += [("no_pixels", "no_pixels", ("pixel_values",))]
            if info.arch == "qwen2_vl":
                invalid += [("no_grid", "no_grid", ("image_grid_thw",)),
                            ("bad_patches", "bad_patches", ("pixel_values",))]
            else:
                invalid += [("wrong_size", "wrong_size", ("pixel_values", "64x64"))]
        if rng.random() < self.p_invalid:
            label, spec, culprits = rng.choice(invalid)
            return Arg(f"inputs:{label}", spec, valid=False, culprits=culprits)
        label, spec = rng.choice(valid)
        return Arg(f"inputs:{label}", spec)

    def _typo(self, rng, name: str, info) -> str:
        valid = set(info.names)
        for _ in range(50):
            op = rng.randrange(5)
            if op == 0 and len(name) > 3:
                i = rng.randrange(len(name) - 1)
                t = name[:i] + name[i + 1] + name[i] + name[i + 2:]
            elif op == 1:
                i = rng.randrange(len(name))
                t = name[:i] + name[i + 1:]
            elif op == 2:
                i = rng.randrange(len(name) + 1)
                t = name[:i] + rng.choice("xqz") + name[i:]
            elif op == 3 and re.search(r"\d+", name):
                t = re.sub(r"\d+", str(rng.choice([7, 12, 31])), name, count=1)
            else:
                t = name.rsplit(".", 1)[0] + "." + rng.choice(["resid_pots", "atn", "mlp_out", "pattern_", "outt"])
            if t and t not in valid and not any(c in t for c in "*?[") and not t.endswith(".probs"):
                return t
        return name + "_typo"

    def _glob(self, rng, pool: list[str], info) -> str | None:
        """A glob derived from a name of `pool` that matches names of `pool` only (None if none found)."""
        name = rng.choice(pool)
        for _ in range(6):
            op = rng.randrange(4)
            if op == 0 and re.search(r"\d+", name):
                g = re.sub(r"\d+", "*", name, count=1)
            elif op == 1 and re.search(r"\d", name):
                g = re.sub(r"\d", "?", name, count=1)
            elif op == 2 and re.search(r"\.\d\.", name):
                g = re.sub(r"\.\d\.", ".[01].", name, count=1)
            else:
                g = "*." + ".".join(name.split(".")[-2:])
            hits = [n for n in info.names if fnmatch.fnmatchcase(n, g)]
            if hits and set(hits) <= set(pool):
                return g
        return None

    def _draw_names(self, rng, info) -> Arg:
        if rng.random() < self.p_invalid:
            kind = rng.choice(["typo", "typo", "glob_none", "int", "int_list", "none_in_list", "huge", "bytes", "dict"])
            name = rng.choice(info.names)
            if kind == "typo":
                t = self._typo(rng, name, info)
                return Arg("names:typo", ("value", t), valid=False, culprits=(t,))
            if kind == "glob_none":
                g = rng.choice(["nothing.*.here", name.rsplit(".", 1)[0] + ".*_pots", "*.blocks.99.*"])
                return Arg("names:glob_none", ("value", g), valid=False, culprits=(g,))
            spec = {"int": 5, "int_list": [name, 5], "none_in_list": [name, None], "huge": "x" * 100_000,
                    "bytes": name.encode(), "dict": {name: 1}}[kind]
            return Arg(f"names:{kind}", ("value", spec), valid=False, culprits=("names",))
        kind = rng.choice(["none", "omit", "exact", "exact", "list", "glob", "glob", "star", "gen", "tuple", "empty",
                           "alias", "dup", "pattern", "pattern"])
        pool = info.names
        if kind in ("none", "omit"):
            return Arg(f"names:{kind}", ("value", None), omit=kind == "omit")
        if kind == "exact":
            return Arg("names:exact", ("value", rng.choice(pool)))
        if kind in ("list", "gen", "tuple"):
            picked = rng.sample(pool, k=min(len(pool), rng.choice([2, 3, 5])))
            spec = (kind if kind != "list" else "value", picked if kind != "tuple" else tuple(picked))
            return Arg(f"names:{kind}", spec)
        if kind == "glob":
            g = self._glob(rng, pool, info)
            return Arg("names:glob", ("value", g or rng.choice(pool)))
        if kind == "star":
            return Arg("names:star", ("value", "*"))
        if kind == "empty":
            return Arg("names:empty", ("value", []))
        if kind == "dup":
            n = rng.choice(pool)
            return Arg("names:dup", ("value", [n, n]))
        pats = rng.sample(info.patterns, k=min(len(info.patterns), rng.choice([1, 1, 2])))
        if kind == "alias":
            return Arg("names:alias", ("value", [p[: -len(".pattern")] + ".probs" for p in pats]))
        return Arg("names:pattern", ("value", pats))

    def _draw_kind(self, rng, group: str) -> str:
        r = rng.random()
        if r < self.p_invalid / 2:
            return rng.choice(sorted(BAD_RETURNS))
        if r < self.p_invalid / 2 + 0.03:
            return "raise"
        if group == "pattern":
            return rng.choice(["read", "read", "read", "none", "p_same", "p_f64", "p_onehot", "p_uniform"])
        return rng.choice(["read", "read", "read", "none", "scale", "f64", "half", "round"])

    def _draw_hooks(self, rng, info, entry) -> Arg:
        if entry != "hooks" and rng.random() < 0.3:
            return Arg("hooks:none", None, omit=rng.random() < 0.5)
        if rng.random() < self.p_invalid * 0.6:
            kind = rng.choice(["list", "none_key", "int_key", "typo_key", "glob_none_key", "noncallable",
                               "noncallable_str", "empty_chain"])
            name = rng.choice(info.names)
            if kind == "typo_key":
                t = self._typo(rng, name, info)
                return Arg("hooks:typo_key", [(t, ["read"], False)], valid=False, culprits=(t,))
            if kind == "glob_none_key":
                g = name.rsplit(".", 1)[0] + ".*_nope"
                return Arg("hooks:glob_none_key", [(g, ["read"], False)], valid=False, culprits=(g,))
            spec = {"list": ("list", name), "none_key": [(None, ["read"], False)], "int_key": [(3, ["read"], False)],
                    "noncallable": [(name, ["int3"], False)], "noncallable_str": [(name, ["str"], True)],
                    "empty_chain": [(name, [], True)]}[kind]
            return Arg(f"hooks:{kind}", spec, valid=False, culprits=("hooks",))
        items, used = [], set()
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
            group = "pattern" if rng.random() < 0.35 else "value"
            pool = info.patterns if group == "pattern" else info.values
            r = rng.random()
            key = None
            if r < 0.3:
                key = self._glob(rng, pool, info)
            elif r < 0.4 and group == "pattern":
                key = rng.choice(pool)[: -len(".pattern")] + ".probs"
            key = key or rng.choice(pool)
            if key in used:  # a dict holds a key once
                continue
            used.add(key)
            chain = [self._draw_kind(rng, group) for _ in range(rng.choice([1, 1, 2]))]
            items.append((key, chain, len(chain) > 1 or rng.random() < 0.2))
        return Arg("hooks:" + "+".join("/".join(c) for _, c, _ in items), items)

    def _involved_patterns(self, info, a) -> list[str]:
        out = []
        names = a.get("names")
        if names is not None and names.valid:
            with contextlib.suppress(_Bad):
                out += [n for n in resolve_names(names, info) if n in info.shapes]
        for key, _, _ in hook_items(a["hooks"]):
            with contextlib.suppress(_Bad):
                out += [n for n in resolve(key, info) if n in info.shapes]
        return list(dict.fromkeys(out))

    def _edited_patterns(self, info, a) -> set[str]:
        out = set()
        for key, chain, _ in hook_items(a["hooks"]):
            if any(k in PATTERN_EDITS for k in chain):
                with contextlib.suppress(_Bad):
                    out |= set(resolve(key, info))
        return out

    def _draw_sel(self, rng, info, arg, involved, dim, edited=frozenset()) -> Arg:
        r = rng.random()
        if r < 0.55 or not info.shapes:
            return Arg(f"{arg}:none", None, omit=rng.random() < 0.5)
        target = rng.choice(involved or sorted(info.shapes))
        if edited and rng.random() < 0.85:  # edits need full maps: select on the other sites only, mostly
            others = [n for n in (involved or sorted(info.shapes)) if n not in edited]
            if not others:
                return Arg(f"{arg}:none", None, omit=rng.random() < 0.5)
            target = rng.choice(others)
            label, spec = self._sel_spec(rng, info.shapes[target][dim])
            return Arg(f"{arg}:dict[{label}]", ("dict", [(target, spec)]))
        size = info.shapes[target][dim]
        if r < 0.55 + 0.45 * self.p_invalid * 1.5:  # invalid whatever the sizes
            label, spec = rng.choice([
                ("float", ("raw", [0.5])), ("scalar", ("raw", 2)), ("bool_scalar", ("raw", True)),
                ("str", ("raw", "0")),
                ("2d", ("raw", lambda: torch.tensor([[0, 1]]))), ("empty", ("list", [])),
                ("float_tensor", ("raw", lambda: torch.tensor([0.0]))), ("mixed", ("raw", [True, 1])),
                ("none_item", ("raw", [0, None])), ("float_scalar", ("raw", 1.5)), ("set", ("raw", {0, 1})),
                ("dict_typo", ("dict", [("nope.*.pattern", ("list", [0]))])),
                ("dict_bad_value", ("dict", [(target, ("raw", 2))])),
            ])
            return Arg(f"{arg}:{label}", spec, valid=False, culprits=(arg,))
        label, spec = self._sel_spec(rng, size)
        if rng.random() < 0.2:
            keys = [target] if rng.random() < 0.5 else [self._glob(rng, info.patterns, info) or target]
            return Arg(f"{arg}:dict[{label}]", ("dict", [(k, spec) for k in keys]))
        return Arg(f"{arg}:{label}", spec)

    def _sel_spec(self, rng, size):
        k = min(size, 3)
        choices = [
            ("int", ("list", [rng.randrange(-size, size)])), ("ints", ("list", rng.sample(range(size), k=k))),
            ("neg", ("list", [-1])), ("neg2", ("list", [-2 % size - size, 0])), ("dup", ("list", [0, 0])),
            ("range", ("range", (0, min(2, size)))), ("slice", ("slice", (0, 2))),
            ("slice_step", ("slice", (None, None, 2))),
            ("slice_neg", ("slice", (-3, None))), ("tensor", ("tensor", [0, -1])), ("ndarray", ("ndarray", [1 % size])),
            ("mask", ("mask", size, sorted(rng.sample(range(size), k=max(1, k - 1))))),
            ("mask_list", ("mask_list", size, [size - 1])),
        ]
        bad = [  # invalid for this size (range, length, nothing selected): refused when a site sees them
            ("oob", ("list", [size + rng.randrange(0, 50)])), ("oob_neg", ("list", [-size - 1 - rng.randrange(0, 5)])),
            ("mask_len", ("mask", size + rng.choice([-1, 1]), [0])), ("mask_empty", ("mask", size, [])),
            ("slice_empty", ("slice", (size, None))),
        ]
        return rng.choice(bad if rng.random() < 2 * self.p_invalid else choices)

    def _draw_steps(self, rng, info, entry, arg) -> Arg:
        diff = info.arch in DIFFUSION
        if not diff:  # models without denoising steps must refuse them
            if rng.random() < self.p_invalid / 2:
                return Arg(f"{arg}:given", ("raw", [0]), valid=False, culprits=(arg,))
            return omitted(arg)
        if rng.random() < self.p_invalid:
            label, spec = rng.choice([("float", [0.5]), ("int", 1), ("str", "0"), ("empty", []), ("bool", [True]),
                                      ("none_item", [None]), ("float_scalar", 2.0)])
            return Arg(f"{arg}:{label}", ("raw", spec), valid=False, culprits=(arg,))
        if rng.random() < 0.55:
            return omitted(arg)
        label, spec = rng.choice([("0", [0]), ("1", [1]), ("-1", [-1]), ("range", range(2)), ("tuple", (0, 1)),
                                  ("tensor", "tensor"), ("dup", [0, 0]), ("set", {1}), ("2", [2]), ("-3", [-3])])
        return Arg(f"{arg}:{label}", ("raw", spec))  # range validity is settled against the entry point

    def _draw_guidance(self, rng, diff) -> Arg:
        if not diff:
            if rng.random() < self.p_invalid / 2:
                return Arg("guidance:True", True, valid=False, culprits=("guidance",))
            return omitted("guidance")
        if rng.random() < 0.75:
            return omitted("guidance")
        return self._pick(rng, [("True", True), ("False", False)], [("str", "yes"), ("int", 1)], "guidance", p_omit=0)

    def _draw_dtype(self, rng) -> Arg:
        return self._pick(rng, [("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.float32),
                                ("'float16'", "float16"), ("'torch.bfloat16'", "torch.bfloat16"),
                                ("float64", torch.float64),
                                ("'float'", "float"), ("None", None)],
                          [("int8", torch.int8), ("'int8'", "int8"), ("3", 3), ("'float8'", "float8"),
                           ("complex64", torch.complex64), ("bool", torch.bool), ("'torch.int32'", "torch.int32")],
                          "cache_dtype", p_omit=0.6)

    def _draw_device(self, rng) -> Arg:
        invalid = [("'gpu'", "gpu"), ("3", 3), ("'meta'", "meta"), ("list", []), ("'nodevice:0'", "nodevice:0")]
        if not torch.cuda.is_available():
            invalid.append(("'cuda' (not available)", "cuda"))
        return self._pick(rng, [("'cpu'", "cpu"), ("device('cpu')", torch.device("cpu")), ("None", None)], invalid,
                          "cache_device", p_omit=0.75)

    def _draw_grad(self, rng) -> Arg:
        return self._pick(rng, [("True", True), ("False", False)],
                          [("'yes'", "yes"), ("1", 1), ("None", None)], "grad", p_omit=0.7)

    def _draw_extra(self, rng, entry, diff) -> Arg:
        if rng.random() >= self.p_invalid * 0.6:
            return Arg("extra:none", None, omit=True)
        key = rng.choice(["hook", "name", "cache_dtyp", "attn_row", "record", "step", "nmes", "attn_head"])
        where = rng.choice(["hooks", "model"]) if entry == "hooks" else "call"
        return Arg(f"extra:{key}@{where}", (where, key), valid=False, culprits=(key,))
