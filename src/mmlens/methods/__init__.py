"""Techniques, one module each, one call shape: `technique(lens, inputs, *, names=..., ...) -> Result`.

Read-out: `logit_lens` (generative VLMs), `joint_lens` (its contrastive analogue). Every result saves, loads,
plots and renders in Jupyter (`result.Result`). Methods import only the core (lens, hooks, caches, token maps, viz),
never `world`, `organisms` or `testing`: the scoring in `benchmarks/groundtruth.py` imports methods, not the reverse.
"""

from .logit_lens import JointLensResult, LogitLensResult, joint_lens, logit_lens
from .result import Result, provenance

__all__ = ["JointLensResult", "LogitLensResult", "Result", "joint_lens", "logit_lens", "provenance"]
