"""What a fuzz case is made of and how its outcome is judged.

The constants (architectures, entry points, the edits and bad returns hooks may do), a drawn argument (`Arg`), what a
valid case does (`Plan`), the case itself (`Case`), what came out of running it (`Outcome`), the facts the oracle
measured about one model (`Info`), and `classify`, which sorts an executed case into ok / silent_wrong / crash /
unclear / hang.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch

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


def omitted(arg: str) -> Arg:
    """An argument left out of the call."""
    return Arg(f"{arg}:omitted", None, omit=True)


def hook_items(arg: Arg) -> list:
    """The (key, chain, as_list) items of a valid `hooks` argument drawn as a dict ([] otherwise)."""
    return arg.spec if arg.valid and isinstance(arg.spec, list) else []


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


# ---------------------------------------------------------------------------------------------- judging
def mentions(message: str, culprit: str) -> bool:
    """Whether an error message names `culprit`. An argument name must appear as a word of its own (`steps`
    does not match `num_inference_steps`, and `names` does not match "Closest valid names")."""
    if re.fullmatch(r"[A-Za-z_]\w*", culprit):
        return re.search(rf"(?<![\w.])(?<!valid ){re.escape(culprit)}(?!\w)", message) is not None
    return culprit in message


def classify(case: Case, out: Outcome) -> tuple[str, str]:
    """(class, reason) of one executed case; see the docstring of `mmlens.testing.fuzz`."""
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
