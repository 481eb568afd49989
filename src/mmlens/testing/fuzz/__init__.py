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

Importing this package imports neither pytest nor hypothesis.

Where things are:

* `cases.py`: constants, `Arg` / `Plan` / `Case` / `Outcome` / `Info`, `classify`, `mentions`.
* `draw.py`: drawing every argument of a case from its pool (`Fuzzer.case`).
* `settle.py`: what the drawn arguments mean together: the plan and the arguments invalid only in context.
* `resolve.py`: names and globs to hook points, selection specs to values and indices.
* `run.py`: the mmlens call of a case, run under the watchdog with leak snapshots (`Fuzzer.run`, `Fuzzer.check`).
* `oracle.py`: the same model run with plain torch hooks (`reference`), attention observed without mmlens.
* `check.py`: a successful valid call compared with the oracle (`Fuzzer.verify`).
* `state.py`: leak snapshots, the watchdog, the tiny models (`build_all`).
* `fuzzer.py`: `Fuzzer`, the lenses and inputs it runs on, and the facts measured once per model (`info`).
"""

from .cases import (ALLOWED_HINT, ARCHS, BAD_RETURNS, BOOM, CLASSES, CLEAR_KINDS, DIFFUSION, EDITS, ENTRIES, FOLDER_OF,
                    N_STEPS, PATTERN_EDITS, PROMPT, SD_CLASSIC, VALUE_EDITS, VARIANTS, Arg, Case, CaseTimeout,
                    FuzzHookError, Info, Outcome, Plan, classify, mentions, says_what_is_allowed)
from .fuzzer import Fuzzer
from .resolve import sel_index, sel_value, select
from .state import build_all, leaks, quiet, snapshot, watchdog

__all__ = [
    "ALLOWED_HINT", "ARCHS", "BAD_RETURNS", "BOOM", "CLASSES", "CLEAR_KINDS", "DIFFUSION", "EDITS", "ENTRIES",
    "FOLDER_OF", "N_STEPS", "PATTERN_EDITS", "PROMPT", "SD_CLASSIC", "VALUE_EDITS", "VARIANTS",
    "Arg", "Case", "CaseTimeout", "FuzzHookError", "Fuzzer", "Info", "Outcome", "Plan",
    "build_all", "classify", "leaks", "mentions", "quiet", "says_what_is_allowed", "sel_index", "sel_value", "select",
    "snapshot", "watchdog",
]
