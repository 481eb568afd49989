"""The Fuzzer: the tiny lenses it runs on, their inputs, and the facts the oracle measures once per model.

Drawing cases (draw.py), running them (run.py) and checking them against the oracle (check.py) are mixed in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .cases import ARCHS, DIFFUSION, FOLDER_OF, N_STEPS, PROMPT, SD_CLASSIC, Info, Plan
from .check import CheckMixin
from .draw import DrawMixin
from .oracle import _Ref, reference
from .run import RunMixin
from .settle import settle
from .state import quiet


class Fuzzer(DrawMixin, RunMixin, CheckMixin):
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
            from ..tiny_models import sample_inputs

            self._inputs[key] = sample_inputs(arch, self.lens(arch), batch=2 if variant == "b2" else 1)
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self._inputs[key].items()}

    def pipe_kwargs(self, arch: str, variant: str) -> dict:
        kw = dict(prompt=PROMPT, num_inference_steps=N_STEPS, height=32, width=32, output_type="np",
                  guidance_scale=5.0 if variant == "cfg" else 1.0, generator=torch.Generator().manual_seed(0))
        if arch == "pixart":
            kw.update(use_resolution_binning=False, clean_caption=False)
        return kw

    def _pipe_call(self, arch: str, variant: str, overrides: Mapping) -> dict:
        """The pipeline call's keywords: `pipe_kwargs` updated with `overrides`, a prompt of None left out."""
        kw = {**self.pipe_kwargs(arch, variant), **overrides}
        if kw.get("prompt") is None:
            kw.pop("prompt", None)
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

    # ---------------------------------------------------------------------------------------- oracle
    def _reference(self, arch: str, variant: str, plan: Plan, entry: str, call_kwargs: dict,
                   grad_names: tuple[str, ...] = (), inputs: dict | None = None, eager: bool = False) -> _Ref:
        """The call with plain torch hooks: the same edits, the values read and recorded, per step. Attention
        probabilities: recomputed from the arguments of each `F.scaled_dot_product_attention` call inside the module
        (`eager=True`: the softmax of the eager-attention copy), edits fed back as `p @ v`. `entry` is not used: the
        oracle calls the model itself."""
        diff = arch in DIFFUSION
        lens = self.eager(arch) if eager else self.lens(arch)

        def call():
            if diff:
                return lens.model(**self._pipe_call(arch, variant, call_kwargs))
            with torch.set_grad_enabled(bool(grad_names)):
                return lens.model(**(inputs if inputs is not None else self.inputs(arch, variant)))

        return reference(lens, plan, call, grad_names)

    _settle = staticmethod(settle)  # the expected outcome of a (hand-made) case
