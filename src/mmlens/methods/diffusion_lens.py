"""Diffusion Lens (Toker et al. 2024): generate from each text-encoder layer's states, passed through the encoder's
final norm, as if the encoder stopped there; what the samples show is what that layer already encodes.

    res = diffusion_lens(sd, ["a red square", "a blue circle"], num_inference_steps=25, guidance_scale=1.5)
    res.images                     # (layers, prompts, H, W, 3) in [0, 1]
    res.plot()                     # layers x prompts

The negative prompt ("", for classifier-free guidance) is read from the same layer, so both halves of the guided
batch come from one depth. The last block's states through the final norm are exactly the pipeline's own prompt
embeddings: that row equals a plain generation with the same generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from .result import Result, provenance, require_family


@dataclass(repr=False)
class DiffusionLensResult(Result):
    """`images` (layers, prompts, H, W, 3) in [0, 1]: row k generated from `names[k]`'s states of `prompts`."""

    names: list[str]
    prompts: list[str]
    images: Tensor

    def summary(self) -> str:
        layers, n, h, w, _ = self.images.shape
        return f"DiffusionLensResult({self.meta.get('architecture')}: {layers} layers x {n} prompts, {h}x{w} images)"

    def plot(self, max_prompts: int = 8):
        import matplotlib.pyplot as plt

        n = min(max_prompts, len(self.prompts))
        fig, axes = plt.subplots(len(self.names), n, figsize=(1.3 * n, 1.3 * len(self.names) + 0.4), squeeze=False)
        for li, name in enumerate(self.names):
            for pi in range(n):
                ax = axes[li][pi]
                ax.imshow(self.images[li, pi].numpy())
                ax.set_xticks([])
                ax.set_yticks([])
                if pi == 0:
                    ax.set_ylabel(name.replace("text_encoder.", "").replace(".resid_post", ""), fontsize=6)
                if li == 0:
                    ax.set_title(self.prompts[pi], fontsize=6)
        fig.suptitle("diffusion lens: samples from each text-encoder layer", fontsize=8)
        return fig


def _states(lens, texts: list[str], names: list[str]) -> list[Float[Tensor, "batch seq d"]]:
    """Each layer's states of `texts` (tokenised as the pipeline does), through the text encoder's final norm."""
    pipe = lens.model
    tok = pipe.tokenizer
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    seen: dict[str, Tensor] = {}
    with lens.hooks(captures={n: [lambda v, ctx: seen.__setitem__(ctx.name, v)] for n in names}):
        pipe.text_encoder(ids)
    norm = lens.sites["text_encoder.ln_final"].module
    return [norm(seen[n]) for n in names]


@torch.no_grad()
def diffusion_lens(lens, prompts: str | Sequence[str], *, names: str | Sequence[str] | None = None,
                   **generate_kwargs) -> DiffusionLensResult:
    """Generate `prompts` from each of `names` (default: the text encoder's embeddings and every block) through its
    final norm. Keywords go to the pipeline (`num_inference_steps`, `guidance_scale`, `generator`, `height`, ...);
    the `generator` (default: seeded with 0) is re-seeded from its initial state for every layer, so the rows differ
    only by the text states.
    Stable Diffusion pipelines (one CLIP text encoder) are supported."""
    require_family(lens, "diffusion", "diffusion_lens")
    if lens.architecture != "sd_unet" or getattr(lens.model, "text_encoder", None) is None:
        raise NotImplementedError(f"diffusion_lens reads one CLIP text encoder (Stable Diffusion); {lens.architecture} "
                                  "conditions on other encoders")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    bad = [k for k in ("prompt", "prompt_embeds", "negative_prompt", "negative_prompt_embeds", "output_type")
           if k in generate_kwargs]
    if bad:
        raise ValueError(f"diffusion_lens sets {bad} itself (the states of each layer, images as arrays); drop them")
    resolved = lens.resolve(names if names is not None else ["text_encoder.embed", "text_encoder.blocks.*.resid_post"])
    if not all(n.startswith("text_encoder.") and n != "text_encoder.ln_final" for n in resolved):
        raise ValueError(f"diffusion_lens reads text-encoder states before the final norm; got {resolved}")
    generator = generate_kwargs.pop("generator", None)
    if generator is None:  # the same noise for every layer, so rows differ only by the text states
        generator = torch.Generator(device=lens.device).manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be one torch.Generator (re-seeded for every layer); got {type(generator).__name__}")
    seed_state = generator.get_state()
    cond = _states(lens, prompts, resolved)
    uncond = _states(lens, [""] * len(prompts), resolved)
    images = []
    for c, u in zip(cond, uncond):
        generator.set_state(seed_state)
        out = lens(prompt_embeds=c, negative_prompt_embeds=u, generator=generator, output_type="np", **generate_kwargs)
        images.append(torch.as_tensor(out.images).float())
    return DiffusionLensResult(meta=provenance(lens, resolved), names=resolved, prompts=prompts,
                               images=torch.stack(images))
