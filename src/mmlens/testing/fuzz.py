"""Reliability fuzzing of the Lens entry points: a case generator, an executor and an oracle.

Shared by `tests/hooks/test_fuzz.py` (a few dozen cases) and `benchmarks/reliability.py` (thousands).

A *case* is one call on one tiny lens (`run_with_cache`, `with lens.hooks(...): lens(...)`, or `generate`; diffusion
pipelines run 2 steps at 32x32) with every argument drawn, valid or invalid, from a typed pool (`names`, `hooks`,
`attn_rows`/`attn_heads`, `steps`/`record_steps`, `guidance`, `cache_dtype`/`cache_device`, `grad`, `progress`,
unknown keywords, and the model inputs). Cases are a pure function of their seed (`Fuzzer.case(seed)`), and
each knows its expected outcome:

* valid: the call must succeed and agree with an oracle that does not use mmlens: the same model run with plain
  torch hooks on `lens.sites[name].module` (the same edits, the same values read), a step counter on the denoiser
  for diffusion; attention probabilities are observed independently (transformers: a second copy of the model
  loaded with eager attention, its softmax observed; diffusers: `F.scaled_dot_product_attention` observed and
  `softmax(q k^T * scale + mask)` recomputed), edited probabilities are fed back by the oracle itself. Maps must
  sum to 1 over keys, have the selected shape and equal Python indexing of the full map.
* invalid: the call must raise TypeError / ValueError / KeyError / NotImplementedError (UnknownNameError counts)
  whose message names a culprit: the argument (`attn_rows`, `cache_dtype`, `steps`, ...), the hook point, or the key.
* a hook that raises `FuzzHookError` must see exactly that exception come out of the call.

`classify(case, outcome)` sorts every case into ok / silent_wrong (invalid accepted, or a valid result that differs
from the oracle) / crash (a valid call raised, or an exception of another kind) / unclear (the right kind, but the
message does not name the culprit) / hang (over the per-case limit; SIGALRM watchdog in the main thread). The
executor also snapshots every hook, attention processor, the transformers attention table and mmlens' own global
state before and after the call (`snapshot`, `leaks`): anything left over is reported per case.

Importing this module imports neither pytest nor hypothesis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import os
import random
import re
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ARCHS = ("clip", "siglip", "llava", "qwen2_vl", "blip2", "sd", "pixart", "sd3")
# Optional: the SD checkpoint with diffusers' classic AttnProcessor (probabilities from get_attention_scores).
SD_CLASSIC = "sd_classic"
FOLDER_OF = {SD_CLASSIC: "sd"}
DIFFUSION = frozenset({"sd", "pixart", "sd3", SD_CLASSIC})
CLASSES = ("ok", "silent_wrong", "crash", "unclear", "hang")
CLEAR_KINDS = (TypeError, ValueError, KeyError, NotImplementedError)
N_STEPS = 2
PROMPT = "a red square"
BOOM = "fuzz: deliberate failure inside a hook"
VARIANTS = {False: ("b1", "b2"), True: ("nocfg", "cfg")}  # batch 1 / 2; diffusion: guidance 1.0 / 5.0
ENTRIES = {False: (("run_with_cache", "hooks", "generate"), (6, 4, 0.3)),
           True: (("generate", "hooks", "run_with_cache"), (5, 3, 1))}
# What an error should also say: what is allowed (reported as a separate figure, not part of `unclear`).
ALLOWED_HINT = re.compile(r"\b(must|allowed|expected|did you mean|closest|takes|needs?|use|pass|one of|choose|should|"
                          r"has to|have to|only|instead|divisible|provide|cannot|supported|see lens|a hook returns|"
                          r"call the|drop|build|give|write|move|cast)\b", re.I)

VALUE_EDITS: dict[str, Callable] = {
    "scale": lambda x: x * 0.5 + 1.0,
    "f64": lambda x: x.double() * 2,  # float64 must be cast back to the value's dtype
    "half": lambda x: x.half(),
    "round": lambda x: (x * 4).round().long(),
}
PATTERN_EDITS: dict[str, Callable] = {
    "p_same": lambda p: p * 1.0,
    "p_f64": lambda p: p.double(),
    "p_onehot": lambda p: torch.zeros_like(p).index_fill_(-1, torch.tensor([0], device=p.device), 1.0),
    "p_uniform": lambda p: torch.full_like(p, 1.0 / p.shape[-1]),
}
EDITS = {**VALUE_EDITS, **PATTERN_EDITS}
BAD_RETURNS: dict[str, Callable] = {
    "bad_shape": lambda x: x.unsqueeze(0),
    "bad_tuple": lambda x: (x,),
    "bad_float": lambda x: 1.5,
    "bad_ndarray": lambda x: x.detach().cpu().numpy(),
    "bad_list": lambda x: [0.0],
}


class FuzzHookError(RuntimeError):
    """Raised on purpose by a fuzzed hook; must come out of the call unchanged."""


class CaseTimeout(BaseException):
    """Raised by the watchdog inside a case that ran over its time limit."""


# ------------------------------------------------------------------------------------------------ cases
@dataclasses.dataclass
class Arg:
    """One drawn argument: `label` names the pool entry, `spec` is plain data turned into the real value at call time
    (generators and hook functions are single-use), `culprits` are strings of which an error must name one."""

    label: str
    spec: Any = None
    valid: bool = True
    culprits: tuple[str, ...] = ()
    omit: bool = False


@dataclasses.dataclass
class Plan:
    """What a case does, resolved by the oracle itself (fnmatch over `lens.hook_points()`), for valid specs."""

    chains: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # site -> hook kinds, in order
    records: list[str] = dataclasses.field(default_factory=list)  # names recorded in the cache
    rows: dict[str, Any] = dataclasses.field(default_factory=dict)  # pattern site -> selection spec
    heads: dict[str, Any] = dataclasses.field(default_factory=dict)
    fire: set[int] | None = None  # diffusion: steps at which denoiser hooks run
    record: set[int] | None = None
    cfg: bool = False  # the denoiser batch really holds [uncond, cond]
    branches_cfg: bool = False  # what ctx.branches should say
    cache_dtype: torch.dtype | None = None


@dataclasses.dataclass
class Case:
    seed: int
    arch: str
    entry: str  # run_with_cache | hooks | generate
    variant: str
    args: dict[str, Arg]
    raises: bool = False  # a FuzzHookError hook fires
    warns: bool = False  # a '.probs' alias is used: a FutureWarning is due
    plan: Plan = dataclasses.field(default_factory=Plan)

    @property
    def valid(self) -> bool:
        return all(a.valid for a in self.args.values())

    @property
    def culprits(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c for a in self.args.values() if not a.valid for c in a.culprits))

    def describe(self) -> dict:
        return {"seed": self.seed, "arch": self.arch, "entry": self.entry, "variant": self.variant,
                "args": {k: a.label for k, a in self.args.items() if not a.omit},
                "invalid": [k for k, a in self.args.items() if not a.valid], "culprits": list(self.culprits)[:6],
                "hook_raises": self.raises}


@dataclasses.dataclass
class Outcome:
    error: BaseException | None = None
    mismatch: str | None = None  # the oracle's complaint about a successful valid call
    timed_out: bool = False
    seconds: float = 0.0
    warnings: list[str] = dataclasses.field(default_factory=list)
    leaked: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    trace: str | None = None

    @property
    def message(self) -> str:
        return "" if self.error is None else f"{type(self.error).__name__}: {self.error}"


def mentions(message: str, culprit: str) -> bool:
    """Whether an error message names `culprit`. An argument name must appear as a word of its own (`steps`
    does not match `num_inference_steps`, and `names` does not match "Closest valid names")."""
    if re.fullmatch(r"[A-Za-z_]\w*", culprit):
        return re.search(rf"(?<![\w.])(?<!valid ){re.escape(culprit)}(?!\w)", message) is not None
    return culprit in message


def classify(case: Case, out: Outcome) -> tuple[str, str]:
    """(class, reason) of one executed case; see the module docstring."""
    if out.timed_out:
        return "hang", f"over the time limit ({out.seconds:.1f}s)"
    err = out.error
    if err is None:
        if not case.valid:
            return "silent_wrong", f"invalid {', '.join(k for k, a in case.args.items() if not a.valid)} accepted"
        if case.raises:
            return "silent_wrong", "a hook raised but the call succeeded"
        if out.mismatch:
            return "silent_wrong", out.mismatch
        return "ok", ""
    if case.raises and isinstance(err, FuzzHookError) and str(err) == BOOM:
        return "ok", ""
    if case.valid and not case.raises:
        return "crash", f"valid call raised {out.message[:300]}"
    if not isinstance(err, CLEAR_KINDS):
        return "crash", (f"{type(err).__name__} is not a TypeError/ValueError/KeyError/NotImplementedError: "
                         f"{out.message[:300]}")
    if case.valid:  # only a raising hook was due
        return "crash", f"expected FuzzHookError, got {out.message[:300]}"
    msg = str(err)
    if any(mentions(msg, c) for c in case.culprits):
        return "ok", ""
    return "unclear", f"message names none of {list(case.culprits)[:4]}: {out.message[:300]}"


def says_what_is_allowed(message: str) -> bool:
    return ALLOWED_HINT.search(message) is not None


# -------------------------------------------------------------------------------------- leak snapshots
def snapshot(lens) -> dict[str, Any]:
    """Every place a session may leave something: hooks per module, diffusers attention processors (and patched
    `get_attention_scores`), the transformers attention table, mmlens' kernel registry, step tracker, thread guard,
    torch function modes, grad mode, `F.scaled_dot_product_attention`, the pipeline's progress-bar config."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..hooks import attention as A

    hooks, procs = {}, {}
    for name, m in lens.adapter.root().named_modules():
        n = (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
             len(getattr(m, "_backward_pre_hooks", {})))
        if any(n):
            hooks[name or "<root>"] = n
        if A.is_diffusers_attention(m):
            procs[name] = (type(m.processor).__qualname__, id(m.processor))
            if "get_attention_scores" in m.__dict__:
                procs[name + ".get_attention_scores"] = "patched"
    g = torch.nn.modules.module
    hooks["<global>"] = (len(g._global_forward_hooks), len(g._global_forward_pre_hooks),
                         len(g._global_backward_hooks), len(g._global_backward_pre_hooks))
    steps = getattr(lens, "_steps", None)
    state = {
        "kernel_users": {k: v for k, v in A.KERNELS.users.items() if v},
        "kernel_handlers": sum(len(v) for v in A.KERNELS.handlers.values()),
        "kernel_installed": sorted(A.KERNELS.installed),
        "step_users": None if steps is None else (steps._users, steps._handle is not None, len(steps._said) + len(steps._seen)),
        "guard": (lens._guard.owner, lens._guard.depth),
        "sdpa": id(F.scaled_dot_product_attention),
        "function_modes": torch._C._len_torch_function_stack(),
        "grad_enabled": torch.is_grad_enabled(),
        "progress": repr(getattr(lens.model, "_progress_bar_config", None)),
    }
    return {"hooks": hooks, "processors": procs,
            "attention_table": {k: id(v) for k, v in ALL_ATTENTION_FUNCTIONS._local_mapping.items()},
            "state": state}


def leaks(before: dict, after: dict) -> dict[str, list[str]]:
    """category -> what differs between two snapshots (empty when nothing was left)."""
    out = {}
    for cat in before:
        a, b = before[cat], after[cat]
        diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
        if diff:
            out[cat] = diff
    return out


@contextlib.contextmanager
def watchdog(seconds: float | None):
    """Raise CaseTimeout in the main thread after `seconds` (SIGALRM); elsewhere a no-op (callers also time)."""
    usable = (seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def fire(signum, frame):
        raise CaseTimeout(f"over {seconds}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def quiet() -> None:
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def build_all(root: str | os.PathLike, archs=ARCHS) -> dict[str, Path]:
    """Tiny models under `root/<arch>` (built when missing, deterministic weights)."""
    from .tiny_models import build

    quiet()
    folders = {}
    for a in dict.fromkeys(FOLDER_OF.get(a, a) for a in archs):
        f = Path(root) / a
        if not (f / ".complete").exists():
            build(a, f)
            (f / ".complete").write_text("ok")
        folders[a] = f
    return {a: folders[FOLDER_OF.get(a, a)] for a in archs}


# ------------------------------------------------------------------------------------------ selections
class _Bad(Exception):
    """A selection that is invalid for a given size."""


def sel_value(spec):
    """A selection spec -> the value passed to mmlens."""
    if spec is None:
        return None
    kind, *rest = spec
    if kind == "list":
        return list(rest[0])
    if kind == "range":
        return range(*rest[0])
    if kind == "slice":
        return slice(*rest[0])
    if kind == "tensor":
        return torch.tensor(rest[0], dtype=torch.long)
    if kind == "ndarray":
        return np.array(rest[0], dtype=np.int64)
    if kind == "mask":
        m = torch.zeros(rest[0], dtype=torch.bool)
        m[list(rest[1])] = True
        return m
    if kind == "mask_list":
        return [k in set(rest[1]) for k in range(rest[0])]
    if kind == "raw":
        return rest[0]() if callable(rest[0]) else rest[0]
    if kind == "dict":
        return {glob: sel_value(sub) for glob, sub in rest[0]}
    raise ValueError(kind)


def sel_index(spec, size: int) -> torch.Tensor | None:
    """Python's meaning of a (type-valid) selection over `size` entries, as indices; _Bad when it selects
    nothing or reaches outside."""
    if spec is None:
        return None
    kind, *rest = spec
    if kind in ("list", "tensor", "ndarray", "range"):
        items = list(range(*rest[0])) if kind == "range" else list(rest[0])
        if not items or any(not -size <= i < size for i in items):
            raise _Bad
        return torch.tensor([i % size for i in items], dtype=torch.long)
    if kind == "slice":
        idx = torch.arange(size)[slice(*rest[0])]
        if idx.numel() == 0:
            raise _Bad
        return idx
    if kind in ("mask", "mask_list"):
        if rest[0] != size or not rest[1]:
            raise _Bad
        return torch.tensor(sorted(set(rest[1])), dtype=torch.long)
    raise ValueError(kind)


def select(p: torch.Tensor, heads, rows) -> torch.Tensor:
    if heads is not None:
        p = p.index_select(1, heads.to(p.device))
    if rows is not None:
        p = p.index_select(2, rows.to(p.device))
    return p


# --------------------------------------------------------------------------------- oracle: plain hooks
def _ref_get(site, output):
    pick = site.row.pick
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(pick, str):
        return output[pick]
    if hasattr(output, "to_tuple"):
        return output.to_tuple()[pick or 0]
    return output[pick or 0]


def _ref_set(site, output, new):
    pick = site.row.pick
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(pick, str):
        output[pick] = new
        return output
    if hasattr(output, "to_tuple"):
        output[list(output.keys())[pick or 0]] = new
        return output
    items = list(output)
    items[pick or 0] = new
    return tuple(items) if isinstance(output, tuple) else items


def _view(site, t):
    if site.row.part is not None:
        k, n = site.row.part
        t = t.chunk(n, dim=-1)[k]
    if site.row.heads:
        t = t.unflatten(-1, (-1, site.head_dim))
    return t


def _unview(site, new, full):
    if site.row.heads:
        new = new.flatten(-2)
    if site.row.part is not None:
        k, n = site.row.part
        chunks = list(full.chunk(n, dim=-1))
        chunks[k] = new
        new = torch.cat(chunks, dim=-1)
    return new


@dataclasses.dataclass
class _Ctx:
    name: str
    path: str
    step: int | None = None
    timestep: float | None = None
    branches: tuple[str, ...] | None = None


@dataclasses.dataclass
class _Ref:
    output: Any = None
    records: dict[str, list[tuple[int | None, torch.Tensor]]] = dataclasses.field(default_factory=dict)
    logs: list[tuple] = dataclasses.field(default_factory=list)
    graph: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # in-graph full tensors (grad)


def _sdpa_probs(q, k, mask, is_causal, scale):
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    low = torch.finfo(torch.float32).min
    if mask is not None:
        s = s.masked_fill(~mask, low) if mask.dtype == torch.bool else s + mask.float()
    elif is_causal:
        nq, nk = s.shape[-2:]
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool, device=s.device).tril().logical_not(), low)
    return F.softmax(s, dim=-1)


def _sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, is_causal, scale


class _Observe(TorchFunctionMode):
    """Inside an attention module of interest (pushed by its pre-hook), see the probabilities: eager softmax
    (transformers loaded with eager attention, diffusers' classic processor) or SDPA (recomputed). A handler
    may return edited probabilities; the module then goes on with them (softmax) or with `p @ v` (SDPA)."""

    def __init__(self):
        super().__init__()
        self.stack: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.stack:
            return func(*args, **kwargs)
        handler = self.stack[-1]
        if func is F.scaled_dot_product_attention:
            q, k, v, mask, causal, scale = _sdpa_args(*args, **kwargs)
            p = _sdpa_probs(q, k, mask, causal, scale)
            new = handler(p)
            if new is None:
                return func(*args, **kwargs)
            if v.shape[-3] != new.shape[-3]:
                v = v.repeat_interleave(new.shape[-3] // v.shape[-3], dim=-3)
            return torch.matmul(new.to(v.dtype), v)
        if func in (F.softmax, torch.Tensor.softmax, torch.softmax):
            p = func(*args, **kwargs)
            flat = p.dim() == 3  # diffusers' classic get_attention_scores: (batch * heads, q, k)
            p4 = p.unflatten(0, (-1, handler.heads)) if flat else p
            new = handler(p4)
            if new is None:
                return p
            return (new.flatten(0, 1) if flat else new).to(p.dtype)
        return func(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ fuzzer
@dataclasses.dataclass
class Info:
    """Facts about one (arch, variant), measured once by the oracle (plain hooks, not mmlens)."""

    arch: str
    variant: str
    names: list[str]
    patterns: list[str]
    values: list[str]
    fires: set[str]
    shapes: dict[str, tuple[int, ...]]  # pattern -> (batch, heads, rows, keys) of one call
    denoiser: set[str]


class Fuzzer:
    """Cases from seeds, run against tiny lenses, checked by the oracle.

        fz = Fuzzer(build_all("/tmp/tiny"))
        case = fz.case(123); outcome = fz.run(case); cls, why = classify(case, outcome)
    """

    def __init__(self, folders: Mapping[str, os.PathLike] | Callable[[str], os.PathLike], archs=ARCHS,
                 timeout: float = 60.0, p_invalid: float = 0.07):
        source = folders if callable(folders) else folders.__getitem__
        self._folder = lambda a: source(FOLDER_OF.get(a, a))
        self.archs = tuple(archs)
        self.timeout = timeout
        self.p_invalid = p_invalid
        self._lenses: dict[str, Any] = {}
        self._eager: dict[str, Any] = {}
        self._infos: dict[tuple[str, str], Info] = {}
        self._inputs: dict[tuple[str, str], dict] = {}
        quiet()

    # ------------------------------------------------------------------------------------------ models
    def lens(self, arch: str):
        if arch not in self._lenses:
            import mmlens

            lens = mmlens.load(self._folder(arch))
            if arch == SD_CLASSIC:
                from diffusers.models.attention_processor import AttnProcessor

                lens.model.unet.set_attn_processor(AttnProcessor())
            if hasattr(lens.model, "set_progress_bar_config"):
                lens.model.set_progress_bar_config(disable=True)
            self._lenses[arch] = lens
            with torch.no_grad():  # transformers installs its own permanent hooks on a first forward
                self._plain_call(lens, arch, "b1" if arch not in DIFFUSION else "cfg")
                if arch in DIFFUSION:
                    self._plain_call(lens, arch, "nocfg")
        return self._lenses[arch]

    def eager(self, arch: str):
        """The same checkpoint with eager attention: the oracle reads its softmax."""
        if arch not in self._eager:
            import mmlens

            self._eager[arch] = mmlens.load(self._folder(arch), attn_implementation="eager")
        return self._eager[arch]

    def repair(self, arch: str) -> None:
        """Reload a lens something was left on, so later cases start clean."""
        self._lenses.pop(arch, None)
        self.lens(arch)

    def inputs(self, arch: str, variant: str) -> dict:
        key = (arch, variant)
        if key not in self._inputs:
            from .tiny_models import sample_inputs

            self._inputs[key] = sample_inputs(arch, self.lens(arch), batch=2 if variant == "b2" else 1)
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self._inputs[key].items()}

    def pipe_kwargs(self, arch: str, variant: str) -> dict:
        kw = dict(prompt=PROMPT, num_inference_steps=N_STEPS, height=32, width=32, output_type="np",
                  guidance_scale=5.0 if variant == "cfg" else 1.0, generator=torch.Generator().manual_seed(0))
        if arch == "pixart":
            kw.update(use_resolution_binning=False, clean_caption=False)
        return kw

    def _plain_call(self, lens, arch, variant, **extra):
        if arch in DIFFUSION:
            return lens.model(**self.pipe_kwargs(arch, variant), **extra)
        return lens.model(**self.inputs(arch, variant), **extra)

    def info(self, arch: str, variant: str) -> Info:
        key = (arch, variant)
        if key not in self._infos:
            lens = self.lens(arch)
            names = lens.hook_points()
            patterns = [n for n in names if lens.sites[n].row.read == "pattern"]
            den = getattr(lens.adapter, "denoiser", None)
            paths = {n: lens.sites[n].path for n in names}
            denoiser = {n for n, p in paths.items() if den and (p == den or p.startswith(den + "."))}
            plan = Plan(records=list(names), cfg=variant == "cfg", branches_cfg=variant == "cfg")
            ref = self._reference(arch, variant, plan, entry="run_with_cache", call_kwargs={})
            fires = {n for n, v in ref.records.items() if v}
            shapes = {n: tuple(ref.records[n][0][1].shape) for n in patterns if n in fires}
            if arch not in DIFFUSION:  # the oracle's recomputed maps against transformers' own eager softmax
                eager = self._reference(arch, variant, Plan(records=patterns), "run_with_cache", {}, eager=True)
                for n in patterns:
                    a, b = ref.records.get(n, []), eager.records.get(n, [])
                    if len(a) != len(b) or any(not torch.allclose(x, y, atol=1e-5) for (_, x), (_, y) in zip(a, b)):
                        raise RuntimeError(f"fuzz oracle: recomputed {n} of {arch}/{variant} differs from the "
                                           "eager softmax")
            self._infos[key] = Info(arch, variant, names, patterns, [n for n in names if n not in set(patterns)],
                                    fires, shapes, denoiser)
        return self._infos[key]

    # -------------------------------------------------------------------------------------- generation
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
            a[arg] = Arg(f"{arg}:omitted", None, omit=True) if plain else \
                self._draw_sel(rng, info, arg, involved, dim, edited)
        if entry in ("generate", "hooks") or not diff:
            a["steps"] = self._draw_steps(rng, info, entry, "steps")
            a["record_steps"] = self._draw_steps(rng, info, entry, "record_steps")
        if entry == "hooks":
            a["guidance"] = self._draw_guidance(rng, diff)
        if entry != "hooks":
            a["cache_dtype"] = Arg("cache_dtype:omitted", None, omit=True) if plain else self._draw_dtype(rng)
            a["cache_device"] = Arg("cache_device:omitted", None, omit=True) if plain else self._draw_device(rng)
        if entry == "generate" and diff:
            a["progress"] = self._pick(rng, valid=[("False", False)],
                                       invalid=[("str", "no"), ("int", 0), ("None", None)], arg="progress", p_omit=0.0)
        a["extra"] = self._draw_extra(rng, entry, diff)
        case = Case(seed, arch, entry, variant, a)
        self._settle(case, info)
        return case

    def _pick(self, rng, valid, invalid, arg, p_omit=0.5, culprits=None):
        if invalid and rng.random() < self.p_invalid:
            label, value = rng.choice(invalid)
            return Arg(f"{arg}:{label}", value, valid=False, culprits=culprits or (arg,))
        if rng.random() < p_omit:
            return Arg(f"{arg}:omitted", None, omit=True)
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
            try:
                out += [n for n in self._resolve_names(names, info) if n in info.shapes]
            except _Bad:
                pass
        hooks = a["hooks"]
        if hooks.valid and isinstance(hooks.spec, list):
            for key, _, _ in hooks.spec:
                with contextlib.suppress(_Bad):
                    out += [n for n in self._resolve(key, info) if n in info.shapes]
        return list(dict.fromkeys(out))

    def _edited_patterns(self, info, a) -> set[str]:
        hooks, out = a["hooks"], set()
        if hooks.valid and isinstance(hooks.spec, list):
            for key, chain, _ in hooks.spec:
                if any(k in PATTERN_EDITS for k in chain):
                    with contextlib.suppress(_Bad):
                        out |= set(self._resolve(key, info))
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
            return Arg(f"{arg}:omitted", None, omit=True)
        if rng.random() < self.p_invalid:
            label, spec = rng.choice([("float", [0.5]), ("int", 1), ("str", "0"), ("empty", []), ("bool", [True]),
                                      ("none_item", [None]), ("float_scalar", 2.0)])
            return Arg(f"{arg}:{label}", ("raw", spec), valid=False, culprits=(arg,))
        if rng.random() < 0.55:
            return Arg(f"{arg}:omitted", None, omit=True)
        label, spec = rng.choice([("0", [0]), ("1", [1]), ("-1", [-1]), ("range", range(2)), ("tuple", (0, 1)),
                                  ("tensor", "tensor"), ("dup", [0, 0]), ("set", {1}), ("2", [2]), ("-3", [-3])])
        return Arg(f"{arg}:{label}", ("raw", spec))  # range validity is settled against the entry point

    def _draw_guidance(self, rng, diff) -> Arg:
        if not diff:
            if rng.random() < self.p_invalid / 2:
                return Arg("guidance:True", True, valid=False, culprits=("guidance",))
            return Arg("guidance:omitted", None, omit=True)
        if rng.random() < 0.75:
            return Arg("guidance:omitted", None, omit=True)
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

    # ------------------------------------------------------------------------------------ resolution
    def _resolve(self, pattern, info) -> list[str]:
        if not isinstance(pattern, str):
            raise _Bad
        if pattern.endswith(".probs"):
            pattern = pattern[: -len(".probs")] + ".pattern"
        if pattern in info.names:
            return [pattern]
        hits = [n for n in info.names if fnmatch.fnmatchcase(n, pattern)] if any(c in pattern for c in "*?[") else []
        if not hits:
            raise _Bad
        return hits

    def _resolve_names(self, arg: Arg, info) -> list[str]:
        kind, value = arg.spec
        if value is None:
            return list(info.values)
        items = [value] if isinstance(value, str) else list(value)
        out: list[str] = []
        for p in items:
            out += [n for n in self._resolve(p, info) if n not in out]
        return out

    # ------------------------------------------------------------------------ expected outcome of a case
    def _settle(self, case: Case, info: Info) -> None:
        """Decide what the drawn arguments mean together: the plan of a valid case, and which arguments are
        invalid only in context (selections vs the sites they reach, steps vs the entry point, grad combos)."""
        a, plan, diff = case.args, case.plan, case.arch in DIFFUSION
        plan.cfg = case.variant == "cfg"
        plan.branches_cfg = plan.cfg
        if "guidance" in a and a["guidance"].valid and not a["guidance"].omit:
            plan.branches_cfg = bool(a["guidance"].spec)
        # names and hooks
        if "names" in a and a["names"].valid:
            plan.records = self._resolve_names(a["names"], info)
            case.warns |= a["names"].label == "names:alias"
        hooks = a["hooks"]
        if hooks.valid and isinstance(hooks.spec, list):
            for key, chain, _ in hooks.spec:
                case.warns |= key.endswith(".probs")
                for n in self._resolve(key, info):
                    plan.chains.setdefault(n, []).extend(chain)
        # steps
        n_known = case.entry != "hooks"
        for arg in ("steps", "record_steps"):
            s = a.get(arg)
            if s is None or s.omit or not s.valid or not diff:
                continue
            val = s.spec[1]
            items = [0, 1] if isinstance(val, str) else list(val)
            if n_known and any(not -N_STEPS <= i < N_STEPS for i in items):
                s.valid, s.culprits = False, (arg,)
                continue
            if not n_known and any(i < 0 for i in items):
                s.valid, s.culprits = False, (arg,)
                continue
            setattr(plan, "fire" if arg == "steps" else "record", {i % N_STEPS if n_known else i for i in items})
        if case.entry == "run_with_cache" and not diff:
            for arg in ("steps", "record_steps"):
                if arg in a and not a[arg].omit:
                    a[arg].valid, a[arg].culprits = False, (arg,)
        dt = a.get("cache_dtype")
        if dt is not None and dt.valid and dt.spec is not None:
            spec = dt.spec
            plan.cache_dtype = spec if isinstance(spec, torch.dtype) else getattr(torch, spec.removeprefix("torch."))

        def active(name: str, role: str) -> bool:
            if name not in info.fires:
                return False
            if name not in info.denoiser:
                return True
            steps = plan.fire if role == "hook" else plan.record
            return steps is None or any(0 <= s < N_STEPS for s in steps)

        # hooks that raise or return something wrong, where they really fire
        bad_sites = [n for n, ch in plan.chains.items() if active(n, "hook") and any(k in BAD_RETURNS for k in ch)]
        raise_sites = [n for n, ch in plan.chains.items() if active(n, "hook") and "raise" in ch]
        if bad_sites:
            hooks.valid = False
            hooks.culprits = tuple(bad_sites)
        case.raises = bool(raise_sites)
        # attention selections against the pattern sites they reach
        for arg, dim in (("attn_rows", 2), ("attn_heads", 1)):
            s = a[arg]
            if s.omit or s.spec is None or not s.valid:
                continue
            per_site: dict[str, Any] = {}
            if s.spec[0] == "dict":
                for glob, sub in s.spec[1]:
                    for n in self._resolve(glob, info):
                        per_site[n] = sub
            else:
                per_site = {n: s.spec for n in info.patterns}
            setattr(plan, "rows" if arg == "attn_rows" else "heads", per_site)
            reached = [n for n in dict.fromkeys([*plan.records, *plan.chains]) if n in per_site and n in info.shapes
                       and (n in plan.records and active(n, "record") or n in plan.chains and active(n, "hook"))]
            for n in reached:
                try:
                    sel_index(per_site[n], info.shapes[n][dim])
                except _Bad:
                    s.valid, s.culprits = False, (arg,)
                    break
        # edits of probabilities computed for a subset of rows/heads
        clash = [n for n, ch in plan.chains.items() if active(n, "hook") and any(k in PATTERN_EDITS for k in ch)
                 and (plan.rows.get(n) is not None or plan.heads.get(n) is not None)]
        if clash:
            a["edit+selection"] = Arg("edit+selection", valid=False, culprits=tuple(clash))
        # grad
        g = a.get("grad")
        if g is not None and g.valid and g.spec is True:
            if diff:
                g.valid, g.culprits = False, ("grad",)
            else:
                combo = [k for k in ("cache_device", "cache_dtype", "attn_rows", "attn_heads")
                         if not a[k].omit and a[k].spec is not None]
                if combo:
                    a["grad+" + combo[0]] = Arg("grad+" + "+".join(combo), valid=False, culprits=tuple(combo))

    # ------------------------------------------------------------------------------------- execution
    def _fn(self, kind: str, log: list):
        if kind == "read":
            def fn(x, ctx):
                log.append((ctx.name, ctx.path, ctx.step, ctx.branches, x.detach().clone()))
        elif kind == "none":
            def fn(x, ctx):
                return None
        elif kind == "raise":
            def fn(x, ctx):
                raise FuzzHookError(BOOM)
        elif kind in EDITS:
            edit = EDITS[kind]

            def fn(x, ctx):
                return edit(x)
        elif kind in BAD_RETURNS:
            bad = BAD_RETURNS[kind]

            def fn(x, ctx):
                return bad(x)
        elif kind == "int3":
            return 3
        elif kind == "str":
            return "fn"
        else:
            raise ValueError(kind)
        return fn

    def _hooks_value(self, arg: Arg, log: list):
        spec = arg.spec
        if spec is None:
            return None
        if isinstance(spec, tuple) and spec[0] == "list":
            return [(spec[1], self._fn("read", log))]
        out = {}
        for key, chain, as_list in spec:
            fns = [self._fn(k, log) for k in chain]
            out[key] = fns if as_list else fns[0]
        return out

    def _value(self, name: str, arg: Arg, log: list):
        if name == "hooks":
            return self._hooks_value(arg, log)
        if name == "names":
            kind, value = arg.spec
            return (n for n in value) if kind == "gen" else value
        if name in ("attn_rows", "attn_heads"):
            return sel_value(arg.spec)
        if name in ("steps", "record_steps"):
            v = arg.spec[1]
            return torch.tensor([0, 1]) if v == "tensor" else (list(v) if isinstance(v, list) else v)
        return arg.spec

    def _model_inputs(self, case: Case):
        """(positional inputs, keyword inputs) of a transformers call."""
        kind = case.args["inputs"].spec
        x = self.inputs(case.arch, case.variant)
        from .tiny_models import sample_image

        if kind == "kwargs":
            return None, x
        if kind == "pil":
            return sample_image(0), {}
        if kind == "str":
            return PROMPT, {}
        if kind == "tensor":
            return x["pixel_values"], {}
        if kind == "lists":
            return {k: v.tolist() for k, v in x.items()}, {}
        if kind == "ndarray":
            return {**x, "pixel_values": x["pixel_values"].numpy()}, {}
        if kind == "mask":
            return {**x, "attention_mask": x["attention_mask"][..., :-1]}, {}
        if kind == "images_only":
            return {"pixel_values": x["pixel_values"]}, {}
        if kind == "no_pixels":
            return {k: v for k, v in x.items() if k != "pixel_values"}, {}
        if kind == "no_grid":
            return {k: v for k, v in x.items() if k != "image_grid_thw"}, {}
        if kind == "bad_patches":
            return {**x, "pixel_values": x["pixel_values"][:, :50]}, {}
        if kind == "wrong_size":
            return {**x, "pixel_values": F.interpolate(x["pixel_values"], size=(64, 64))}, {}
        return x, {}

    def _call(self, case: Case, log: list) -> Callable[[], Any]:
        """The mmlens call of a case, as a thunk (its single-use values made fresh)."""
        lens, a, diff = self.lens(case.arch), case.args, case.arch in DIFFUSION
        kw = {}
        for n in ("names", "hooks", "cache_device", "cache_dtype", "attn_rows", "attn_heads", "grad", "steps",
                  "record_steps", "progress", "guidance"):
            if n in a and not a[n].omit:
                kw[n] = self._value(n, a[n], log)
        extra = a["extra"]
        where, key = extra.spec if not extra.omit else (None, None)
        if diff:
            pipe = {**self.pipe_kwargs(case.arch, case.variant), **a["inputs"].spec}
            if pipe.get("prompt") is None:
                pipe.pop("prompt")
        if case.entry == "hooks":
            fns = kw.pop("hooks", None)
            hk = {k: kw[k] for k in ("attn_rows", "attn_heads", "steps", "record_steps", "guidance") if k in kw}
            if where == "hooks":
                hk[key] = 1
            call_extra = {key: 1} if where == "model" else {}

            def go():
                with lens.hooks(fns, **hk):
                    if diff:
                        return lens(**pipe, **call_extra)
                    pos, kws = self._model_inputs(case)
                    return lens(pos, **kws, **call_extra)

            return go
        if where == "call":
            kw[key] = 1
        if case.entry == "generate":
            if not diff:
                return lambda: lens.generate(PROMPT, **kw)
            prompt = pipe.pop("prompt", None)
            if prompt is None:
                return lambda: lens.generate(**kw, **pipe)
            return lambda: lens.generate(prompt, **kw, **pipe)
        if diff:
            return lambda: lens.run_with_cache(pipe, **kw)
        pos, kws = self._model_inputs(case)
        if pos is None:
            return lambda: lens.run_with_cache(**kws, **kw)
        return lambda: lens.run_with_cache(pos, **kws, **kw)

    def run(self, case: Case) -> Outcome:
        """Execute one case: the call under a watchdog, a leak snapshot around it, then the oracle (valid cases)."""
        lens = self.lens(case.arch)
        log: list = []
        thunk = self._call(case, log)
        out = Outcome()
        before = snapshot(lens)
        t0 = time.perf_counter()
        result = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with watchdog(self.timeout):
                    result = thunk()
            except CaseTimeout:
                out.timed_out = True
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 - every kind is classified
                out.error = e
                out.trace = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
        out.seconds = time.perf_counter() - t0
        out.timed_out |= out.seconds > self.timeout
        out.warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
        out.leaked = leaks(before, snapshot(lens))
        if out.leaked:
            self.repair(case.arch)
        if out.error is None and not out.timed_out and case.valid and not case.raises:
            try:
                with watchdog(self.timeout):
                    out.mismatch = self.verify(case, result, log, out.warnings)
            except CaseTimeout:
                out.timed_out = True
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001
                out.mismatch = f"oracle failed on the result: {type(e).__name__}: {e}"
                out.trace = traceback.format_exc()[-1500:]
        return out

    def check(self, seed: int) -> tuple[Case, Outcome, str, str]:
        case = self.case(seed)
        out = self.run(case)
        return (case, out, *classify(case, out))

    # ---------------------------------------------------------------------------------------- oracle
    def _reference(self, arch: str, variant: str, plan: Plan, entry: str, call_kwargs: dict,
                   grad_names: tuple[str, ...] = (), inputs: dict | None = None, eager: bool = False) -> _Ref:
        """The call with plain torch hooks: the same edits, the values read and recorded, per step. Attention
        probabilities: recomputed from the arguments of each `F.scaled_dot_product_attention` call inside the module
        (`eager=True`: the softmax of the eager-attention copy), edits fed back as `p @ v`."""
        diff = arch in DIFFUSION
        lens = self.eager(arch) if eager else self.lens(arch)
        touched = list(dict.fromkeys([*plan.chains, *plan.records]))
        patterns = [n for n in touched if lens.sites[n].row.read == "pattern"]
        grad = bool(grad_names)
        den = getattr(lens.adapter, "denoiser", None)
        ref = _Ref()
        state = {"step": None}
        handles = []
        observer = _Observe()

        def is_den(site):
            return den is not None and (site.path == den or site.path.startswith(den + "."))

        def ctx_of(site):
            if is_den(site):
                return _Ctx(site.name, site.path, state["step"], None,
                            ("uncond", "cond") if plan.branches_cfg else ("cond",))
            return _Ctx(site.name, site.path)

        def gates(site):
            if not is_den(site):
                return True, True
            step = state["step"]
            return (plan.fire is None or step in plan.fire), (plan.record is None or step in plan.record)

        def chain(site, value, ctx, fire):
            cur, edited = value, False
            if fire:
                for kind in plan.chains.get(site.name, ()):
                    if kind == "read":
                        ref.logs.append((ctx.name, ctx.path, ctx.step, ctx.branches, cur.detach().clone()))
                    elif kind in EDITS:
                        cur, edited = EDITS[kind](cur).to(dtype=value.dtype, device=value.device), True
            return cur, edited

        def record(site, value, ctx, rec):
            if rec and site.name in plan.records:
                ref.records.setdefault(site.name, []).append((ctx.step, value.detach().clone()))

        def out_hook(site):
            def hook(mod, args, output):
                fire, rec = gates(site)
                full = _ref_get(site, output)
                if full is None or not (fire or rec):
                    return None
                ctx = ctx_of(site)
                cur, edited = chain(site, _view(site, full), ctx, fire)
                record(site, cur, ctx, rec)
                new = _unview(site, cur, full) if edited else full
                if site.name in grad_names:
                    ref.graph[site.name] = new
                return _ref_set(site, output, new) if edited else None
            return hook

        def in_hook(site):
            def hook(mod, args, kwargs):
                fire, rec = gates(site)
                if not (fire or rec):
                    return None
                if args:
                    full = args[0]
                else:
                    key = "hidden_states" if "hidden_states" in kwargs else next(k for k, v in kwargs.items()
                                                                                 if isinstance(v, torch.Tensor))
                    full = kwargs[key]
                ctx = ctx_of(site)
                cur, edited = chain(site, _view(site, full), ctx, fire)
                record(site, cur, ctx, rec)
                new = _unview(site, cur, full) if edited else full
                if site.name in grad_names:
                    ref.graph[site.name] = new
                if not edited:
                    return None
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, key: new})
            return hook

        class _Handler:
            def __init__(self, site):
                self.site, self.parts = site, []
                self.heads = getattr(site.module, "heads", None)

            def __call__(self, p):
                fire, rec = gates(self.site)
                if not (fire or rec):
                    return None
                ctx = ctx_of(self.site)
                cur, edited = chain(self.site, p, ctx, fire)
                self.parts.append(cur)
                return cur if edited else None

        def pat_pre(handler):
            def hook(mod, args):
                handler.parts = []
                observer.stack.append(handler)
            return hook

        def pat_post(handler):
            def hook(mod, args, output):
                observer.stack.remove(handler)
                fire, rec = gates(handler.site)
                if not handler.parts:
                    if fire or rec:
                        raise RuntimeError(f"oracle saw no attention probabilities in {handler.site.path}")
                    return None
                parts = handler.parts
                nq, nk = max(p.shape[-2] for p in parts), max(p.shape[-1] for p in parts)
                value = torch.cat([F.pad(p, (0, nk - p.shape[-1], 0, nq - p.shape[-2])) for p in parts], dim=0)
                record(handler.site, value, ctx_of(handler.site), rec)
                return None
            return hook

        try:
            if den is not None:
                def count(mod, args):
                    state["step"] = 0 if state["step"] is None else state["step"] + 1
                handles.append(getattr(lens.model, den).register_forward_pre_hook(count))
            for name in touched:
                site = lens.sites[name]
                if site.row.read == "out":
                    handles.append(site.module.register_forward_hook(out_hook(site)))
                elif site.row.read == "in":
                    handles.append(site.module.register_forward_pre_hook(in_hook(site), with_kwargs=True))
                else:
                    h = _Handler(site)
                    handles.append(site.module.register_forward_pre_hook(pat_pre(h)))
                    handles.append(site.module.register_forward_hook(pat_post(h)))
            mode = observer if patterns else contextlib.nullcontext()
            with mode:
                if diff:
                    kw = {**self.pipe_kwargs(arch, variant), **call_kwargs}
                    if kw.get("prompt") is None:
                        kw.pop("prompt", None)
                    ref.output = lens.model(**kw)
                else:
                    with torch.set_grad_enabled(grad):
                        ref.output = lens.model(**(inputs if inputs is not None else self.inputs(arch, variant)))
        finally:
            for h in handles:
                h.remove()
        return ref

    def verify(self, case: Case, result, log: list, warned: list[str]) -> str | None:
        """None when a successful valid call agrees with the oracle, else what differs."""
        if case.warns and not any(w.startswith("FutureWarning") and "alias" in w for w in warned):
            return "a '.probs' alias was used but no FutureWarning was given"
        plan, info, diff = case.plan, self.info(case.arch, case.variant), case.arch in DIFFUSION
        sites = self.lens(case.arch).sites
        patterns = any(sites[n].row.read == "pattern" for n in [*plan.chains, *plan.records])
        call_kwargs = dict(case.args["inputs"].spec) if diff else {}
        inputs = None if diff else self._ref_inputs(case)
        ref = self._reference(case.arch, case.variant, plan, case.entry, call_kwargs, inputs=inputs)
        exact = not patterns
        tol = dict(atol=1e-5, rtol=1e-4) if exact else dict(atol=2e-4, rtol=2e-3)
        output, cache = (result, None) if case.entry == "hooks" else result
        # the model's output
        problem = _compare_outputs(output, ref.output, tol, diff)
        if problem:
            return f"model output differs from the plain-hook run: {problem}"
        # the cache
        if cache is not None:
            problem = self._compare_cache(case, info, cache, ref, tol)
            if problem:
                return problem
        # what read-only hooks saw (value, name, path, step, guidance branches)
        problem = self._compare_logs(case, info, log, ref.logs, tol)
        if problem:
            return problem
        g = case.args.get("grad")
        if cache is not None and g is not None and not g.omit and g.spec is True:
            return self._compare_grad(case, output, cache, inputs)
        return None

    def _ref_inputs(self, case: Case) -> dict:
        pos, kws = self._model_inputs(case)
        return {**(pos or {}), **kws}

    def _selection(self, plan: Plan, info: Info, name: str):
        shape = info.shapes[name]
        return sel_index(plan.heads.get(name), shape[1]), sel_index(plan.rows.get(name), shape[2])

    def _compare_cache(self, case, info, cache, ref, tol) -> str | None:
        plan, diff = case.plan, case.arch in DIFFUSION
        want = [n for n in plan.records if ref.records.get(n)]
        got = list(cache)
        if sorted(got) != sorted(want):
            extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
            return f"cache names differ: missing {missing[:4]}, unexpected {extra[:4]}"
        dtype = plan.cache_dtype
        summary = {r["name"]: r for r in cache.summary()}
        for n in want:
            vals, refs = cache.calls(n), ref.records[n]
            if len(vals) != len(refs):
                return f"{n}: cache holds {len(vals)} calls, the plain hooks saw {len(refs)}"
            if diff and n in info.denoiser and summary[n].get("steps") != [s for s, _ in refs]:
                return f"{n}: recorded at steps {summary[n].get('steps')}, expected {[s for s, _ in refs]}"
            is_pat = n in info.shapes
            for k, (v, (_, r)) in enumerate(zip(vals, refs)):
                if v.device.type != "cpu":
                    return f"{n}: recorded on {v.device}, expected cpu"
                want_dtype = dtype or r.dtype
                if v.dtype != want_dtype:
                    return f"{n}: recorded as {v.dtype}, expected {want_dtype}"
                if is_pat:
                    r = select(r, *self._selection(plan, info, n))
                    problem = _check_probs(n, v, r.shape)
                    if problem:
                        return problem
                problem = _close(n, v, r.to(want_dtype), tol, k)
                if problem:
                    return problem
        return None

    def _compare_logs(self, case, info, log, ref_logs, tol) -> str | None:
        plan = case.plan
        by = lambda entries: {n: [e for e in entries if e[0] == n] for n in {e[0] for e in entries}}  # noqa: E731
        got, want = by(log), by(ref_logs)
        if sorted(got) != sorted(want):
            return f"read-only hooks fired on {sorted(got)[:4]}, plain hooks on {sorted(want)[:4]}"
        for n, entries in want.items():
            if len(got[n]) != len(entries):
                return f"hook on {n} ran {len(got[n])} times, the plain hook {len(entries)} times"
            for k, (g, w) in enumerate(zip(got[n], entries)):
                if g[1:4] != w[1:4]:
                    return f"hook on {n}, call {k}: ctx (path, step, branches) = {g[1:4]}, expected {w[1:4]}"
                r = w[4]
                if n in info.shapes:
                    r = select(r, *self._selection(plan, info, n))
                problem = _close(f"hook on {n}", g[4], r, tol, k)
                if problem:
                    return problem
        return None

    def _compare_grad(self, case, output, cache, inputs) -> str | None:
        """Gradients through the recorded tensors equal gradients through the plain hooks' tensors."""
        plan, sites = case.plan, self.lens(case.arch).sites
        names = [n for n in cache if sites[n].row.read != "pattern" and len(cache.calls(n)) == 1][:2]
        if not names or any(sites[n].row.read == "pattern" for n in plan.chains):
            return None
        metric = _metric(output)
        got = torch.autograd.grad(metric, [cache[n] for n in names], allow_unused=True)
        ref = self._reference(case.arch, case.variant, plan, case.entry, {}, grad_names=tuple(names), inputs=inputs)
        fulls = [ref.graph.get(n) for n in names]
        if any(f is None for f in fulls):
            return None
        want = torch.autograd.grad(_metric(ref.output), fulls, allow_unused=True)
        for n, g, w in zip(names, got, want):
            if w is None:
                if g is not None and g.abs().max() > 0:
                    return f"grad through {n}: nonzero, the plain hook's tensor gets none"
                continue
            if g is None:
                return f"grad through {n}: none reached the recorded tensor"
            problem = _close(f"grad through {n}", g, _view(sites[n], w), dict(atol=1e-5, rtol=1e-3), 0)
            if problem:
                return problem
        return None


def _metric(output) -> torch.Tensor:
    t = next(v for v in output.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    return t.float().square().mean()


def _close(what, got, want, tol, k) -> str | None:
    if tuple(got.shape) != tuple(want.shape):
        return f"{what} (call {k}): shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    g, w = got.detach().float(), want.detach().float()
    if got.dtype in (torch.float16, torch.bfloat16):
        tol = dict(atol=max(tol["atol"], 1e-2), rtol=max(tol["rtol"], 1e-2))
    if not torch.allclose(g, w, **tol, equal_nan=True):
        return f"{what} (call {k}): values differ by up to {(g - w).abs().max().item():.3g}"
    return None


def _check_probs(name, p, shape) -> str | None:
    if tuple(p.shape) != tuple(shape):
        return f"{name}: shape {tuple(p.shape)}, the selection gives {tuple(shape)}"
    s = p.float().sum(-1)
    atol = 1e-2 if p.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(s, torch.ones_like(s), atol=atol):
        return f"{name}: attention rows sum to {s.min().item():.4g}..{s.max().item():.4g}, not 1"
    return None


def _compare_outputs(got, want, tol, diff) -> str | None:
    if diff:
        g, w = np.asarray(got.images), np.asarray(want.images)
        if g.shape != w.shape:
            return f"images of shape {g.shape}, expected {w.shape}"
        err = float(np.abs(g - w).max())
        return None if err <= max(tol["atol"] * 10, 1e-4) else f"images differ by up to {err:.3g}"
    gk = {k: v for k, v in got.items() if isinstance(v, torch.Tensor)}
    wk = {k: v for k, v in want.items() if isinstance(v, torch.Tensor)}
    if sorted(gk) != sorted(wk):
        return f"output fields {sorted(gk)}, expected {sorted(wk)}"
    for k in wk:
        problem = _close(k, gk[k], wk[k], tol, 0)
        if problem:
            return problem
    return None
