"""Techniques, one module each, one call shape: `technique(lens, inputs, *, names=..., ...) -> Result`.

Read-out: `logit_lens` (generative VLMs), `joint_lens` (its contrastive analogue), `TunedLens` and `LinearProbe`
(estimators: `fit`, then `transform` / `score`, `save`/`load`), `probe_sweep` with control tasks, `direct_effects`
and `direct_logit_attribution`. Every result saves, loads, plots and renders in Jupyter (`result.Result`). Methods import only the core (lens, hooks, caches, token maps, viz),
never `world`, `organisms` or `testing`: the scoring in `benchmarks/groundtruth.py` imports methods, not the reverse.
"""

from .diffusion_lens import DiffusionLensResult, diffusion_lens
from .direct_effects import DirectEffectsResult, DirectLogitResult, direct_effects, direct_logit_attribution
from .logit_lens import JointLensResult, LogitLensResult, joint_lens, logit_lens
from .probes import LinearProbe, LinearProbeConfig, ProbeSweepResult, probe_features, probe_sweep
from .result import Result, provenance
from .tuned_lens import TunedLens, TunedLensConfig

__all__ = ["DiffusionLensResult", "DirectEffectsResult", "DirectLogitResult", "JointLensResult", "LinearProbe", "LinearProbeConfig",
           "LogitLensResult", "ProbeSweepResult", "Result", "TunedLens", "TunedLensConfig", "direct_effects",
           "diffusion_lens", "direct_logit_attribution", "joint_lens", "logit_lens", "probe_features", "probe_sweep", "provenance"]
