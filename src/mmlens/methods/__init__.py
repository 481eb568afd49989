"""Techniques, one module each, one call shape: `technique(lens, inputs, *, names=..., ...) -> Result`.

Read-out: `logit_lens` (generative VLMs), `joint_lens` (its contrastive analogue), `TunedLens` and `LinearProbe`
(estimators: `fit`, then `transform` / `score`, `save`/`load`), `probe_sweep` with control tasks and per-pixel
`pixel_probe` on diffusion features, `direct_effects` and `direct_logit_attribution`, `diffusion_lens`, neurons
(`top_activating`, `neuron_logit_weights`, `neuron_attribution`, `ablate_neurons`). Every result saves, loads,
plots and renders in Jupyter (`result.Result`). Methods import only the core (lens, hooks, caches, token maps, viz),
never `world`, `organisms` or `testing`: the scoring in `benchmarks/groundtruth.py` imports methods, not the reverse.
"""

from .data_attribution import (TRAK, AttributionResult, TRAKConfig, TRAKEnsemble, contrastive_margin, diffusion_examples,
                               diffusion_loss, diffusion_square, generative_margin, representation_similarity)
from .diffusion_lens import DiffusionLensResult, diffusion_lens
from .dissection import (DissectionResult, clip_dissect, image_activations, labeller_similarities, net_dissect,
                         unit_maps)
from .direct_effects import (DirectEffectsResult, DirectLogitResult, direct_effects, direct_logit_attribution,
                             split_pooling_mlp)
from .feature_viz import (DatasetExamples, FeatureVizResult, Objective, custom, dataset_examples, direction, unit,
                          vae_decoder, vae_latents, visualize)
from .gradient_maps import GradientMapResult, gradient_map
from .knockout import KnockoutResult, knockout
from .logit_lens import JointLensResult, LogitLensResult, joint_lens, logit_lens
from .attribution_patching import attribution_patching
from .patching import Corruption, PatchResult, gaussian_noise, patch, replace_tokens
from .neurons import (NeuronAttributionResult, NeuronWeightsResult, TopActivations, ablate_neurons,
                      neuron_attribution, neuron_logit_weights, top_activating)
from .probes import (LinearProbe, LinearProbeConfig, PixelFeatures, PixelProbeResult, ProbeSweepResult,
                     diffusion_probe_features, pixel_probe, probe_features, probe_sweep)
from .maps import MapResult
from .relevancy import RelevancyResult, relevancy
from .sae import SAE, SAEConfig
from .sae_dashboard import FeatureDashboard, feature_dashboard
from .sae_metrics import SAEMetricsResult, sae_metrics
from .sae_splice import sae_spliced, steer_features
from .result import Result, provenance
from .splice import SpliceResult, image_embeddings, nonneg_lasso, splice
from .steering import (SteeringSweepResult, SteeringVector, SteeringVectorConfig, steer, steering,
                       steering_sweep, task_vector)
from .textspan import TextSpanResult, encode_texts, text_segmentation, textspan
from .tuned_lens import TunedLens, TunedLensConfig, kl_to_final
from .word_maps import WordMapResult, word_maps

__all__ = ["DiffusionLensResult", "DirectEffectsResult", "DirectLogitResult", "JointLensResult", "KnockoutResult", "knockout", "LinearProbe",
           "LinearProbeConfig", "LogitLensResult", "NeuronAttributionResult", "NeuronWeightsResult", "Corruption", "PatchResult", "attribution_patching", "gaussian_noise", "patch", "replace_tokens", "PixelFeatures",
           "PixelProbeResult", "ProbeSweepResult", "Result", "SteeringSweepResult", "SteeringVector", "SteeringVectorConfig", "steer", "steering", "steering_sweep", "task_vector", "TopActivations", "TunedLens", "TunedLensConfig",
           "ablate_neurons", "diffusion_lens", "diffusion_probe_features", "direct_effects", "direct_logit_attribution", "split_pooling_mlp",
           "joint_lens", "kl_to_final", "logit_lens", "neuron_attribution", "neuron_logit_weights", "pixel_probe", "probe_features",
           "probe_sweep", "provenance", "top_activating",
           "DatasetExamples", "FeatureVizResult", "Objective", "custom", "dataset_examples", "direction", "unit",
           "vae_decoder", "vae_latents", "visualize",
           "AttributionResult", "TRAK", "TRAKConfig", "TRAKEnsemble", "contrastive_margin", "generative_margin",
           "representation_similarity", "diffusion_examples", "diffusion_loss", "diffusion_square",
           "MapResult", "WordMapResult", "word_maps", "GradientMapResult", "RelevancyResult", "gradient_map", "relevancy",
           "DissectionResult", "clip_dissect", "image_activations", "labeller_similarities", "net_dissect", "unit_maps",
           "SpliceResult", "TextSpanResult", "encode_texts", "image_embeddings", "nonneg_lasso", "splice",
           "text_segmentation", "textspan",
           "SAE", "SAEConfig", "FeatureDashboard", "SAEMetricsResult", "feature_dashboard", "sae_metrics", "sae_spliced", "steer_features"]
