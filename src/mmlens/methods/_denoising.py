"""One denoiser forward on noised clean latents, for every pipeline family mmlens knows: what the SAE metrics'
denoising loss and diffusion training-data attribution (D-TRAK) both measure."""

from __future__ import annotations

import torch
from torch import Tensor


class Denoising:
    """One denoiser forward at a chosen timestep on noised clean latents, for the pipelines mmlens knows:
    UNet pipelines (Stable Diffusion 1/2: DDPM noising, epsilon / v / sample targets), PixArt (the same noising;
    its learned-variance half of the output dropped) and SD3 (rectified flow: x_t = (1 - s) x0 + s eps, target
    eps - x0, s = t / num_train_timesteps)."""

    def __init__(self, lens):
        self.lens, self.pipe = lens, lens.model
        sched = self.pipe.scheduler
        self.n_train = int(sched.config.num_train_timesteps)
        if lens.architecture == "sd3":
            self.kind, self.target = "flow", "flow"
        elif hasattr(sched, "alphas_cumprod") and lens.adapter.denoiser in ("unet", "transformer") \
                and lens.architecture in ("sd_unet", "pixart"):
            self.kind, self.target = "ddpm", sched.config.prediction_type
            if self.target not in ("epsilon", "v_prediction", "sample"):
                raise ValueError(f"the scheduler predicts {self.target!r}; the denoising loss knows epsilon, "
                                 "v_prediction and sample")
            if lens.architecture == "sd_unet" and getattr(self.pipe.unet.config, "addition_embed_type", None):
                raise ValueError("this UNet takes added conditioning (SDXL-style time ids and pooled text); the "
                                 "denoising loss supports Stable Diffusion 1/2 UNets, PixArt and SD3")
        else:
            raise ValueError(f"no denoising loss for {lens.architecture} ({type(self.pipe).__name__}); supported: "
                             "Stable Diffusion UNet pipelines, PixArt, SD3")

    def timesteps(self, timesteps) -> list[int]:
        if timesteps is None:
            return [int(self.n_train * f) for f in (0.1, 0.5, 0.9)]
        ts = [timesteps] if isinstance(timesteps, int) else list(timesteps)
        bad = [t for t in ts if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.n_train]
        if bad or not ts:
            raise ValueError(f"timesteps={timesteps!r}: give training timesteps, ints in [0, {self.n_train})")
        return ts

    def resolution(self) -> int:
        """The pipeline's default image side: the denoiser's sample size times the VAE's scale factor."""
        sample = getattr(self.pipe, self.lens.adapter.denoiser).config.sample_size
        sample = sample[0] if isinstance(sample, (tuple, list)) else sample
        return int(sample * getattr(self.pipe, "vae_scale_factor", 8))

    def encode(self, prompts: list[str]) -> dict:
        """The prompts' conditioning without guidance, as the denoiser takes it (keyword -> tensor)."""
        dev = self.lens.device
        if self.lens.architecture == "sd3":
            emb, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=dev,
                                                        do_classifier_free_guidance=False)
            return {"encoder_hidden_states": emb, "pooled_projections": pooled}
        if self.lens.architecture == "pixart":
            emb, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=dev)
            return {"encoder_hidden_states": emb, "encoder_attention_mask": mask}
        emb, _ = self.pipe.encode_prompt(prompts, dev, 1, False)
        return {"encoder_hidden_states": emb}

    def predict(self, x0: Tensor, eps: Tensor, t: int | Tensor, cond: dict) -> tuple[Tensor, Tensor]:
        """(prediction, training target) for clean latents `x0` noised with `eps` at training timestep `t`: one int
        for every row, or a (rows,) integer tensor (one each; indexing only, so `torch.func.vmap` can batch it).
        `cond` as `encode` gives it; floating tensors in it are cast to the model's dtype."""
        dev, dt = self.lens.device, self.lens.dtype
        x0, eps = x0.to(dev, torch.float32), eps.to(dev, torch.float32)
        one = isinstance(t, int)
        tt = torch.full((x0.shape[0],), t, device=dev) if one else t.to(dev).long()
        rows = (-1, *[1] * (x0.dim() - 1))  # a per-row coefficient against (rows, C, h, w)
        cond = {k: v.to(dev, dt) if v.is_floating_point() and k != "encoder_attention_mask" else v.to(dev)
                for k, v in cond.items()}
        if self.kind == "flow":
            s = t / self.n_train if one else (tt.float() / self.n_train).view(rows)
            xt, target = (1 - s) * x0 + s * eps, eps - x0
        else:
            alphas = self.pipe.scheduler.alphas_cumprod
            a = alphas[t].to(dev, torch.float32) if one else alphas.to(dev, torch.float32)[tt].view(rows)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
            target = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.target]
        net = getattr(self.pipe, self.lens.adapter.denoiser)
        if self.lens.architecture == "sd3":
            out = net(hidden_states=xt.to(dt), timestep=tt.to(dt), return_dict=False, **cond)[0]
        elif self.lens.architecture == "pixart":
            extra = {"resolution": None, "aspect_ratio": None}
            if net.config.sample_size == 128:  # PixArt-alpha 1024 is conditioned on size and aspect ratio
                h, w = (s * self.pipe.vae_scale_factor for s in x0.shape[-2:])
                extra = {"resolution": torch.tensor([[h, w]], device=dev, dtype=dt).repeat(len(x0), 1),
                         "aspect_ratio": torch.tensor([[h / w]], device=dev, dtype=dt).repeat(len(x0), 1)}
            out = net(xt.to(dt), timestep=tt, added_cond_kwargs=extra, return_dict=False, **cond)[0]
            if out.shape[1] == 2 * x0.shape[1]:  # learned variance: the prediction is the first half
                out = out[:, : x0.shape[1]]
        else:
            out = net(xt.to(dt), tt, return_dict=False, **cond)[0]
        return out, target


__all__ = ["Denoising"]
