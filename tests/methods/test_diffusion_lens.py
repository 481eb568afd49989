"""Diffusion Lens: the last block's row is the pipeline's own generation; earlier rows differ; errors are clear."""

from __future__ import annotations

import pytest
import torch

from mmlens.methods import DiffusionLensResult, Result, diffusion_lens

KW = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=32)


def test_last_layer_is_the_pipelines_own_generation(tiny_lens, tmp_path):
    lens = tiny_lens("sd")
    prompts = ["a red square", "a blue circle"]
    res = diffusion_lens(lens, prompts, generator=torch.Generator().manual_seed(0), **KW)
    assert res.names == ["text_encoder.embed", "text_encoder.blocks.0.resid_post", "text_encoder.blocks.1.resid_post"]
    assert res.images.shape == (3, 2, 32, 32, 3)
    plain = lens.model(prompts, generator=torch.Generator().manual_seed(0), output_type="np", **KW).images
    torch.testing.assert_close(res.images[-1], torch.as_tensor(plain).float(), atol=1e-5, rtol=0)
    assert (res.images[0] - res.images[-1]).abs().max() > 1e-3  # the embeddings alone condition differently
    back = Result.load(res.save(tmp_path / "dl"))
    assert type(back) is DiffusionLensResult and torch.equal(back.images, res.images) and back.prompts == prompts
    from matplotlib.figure import Figure

    assert isinstance(res.plot(), Figure)


def test_diffusion_lens_errors(tiny_lens):
    with pytest.raises(TypeError, match="diffusion_lens applies to diffusion models"):
        diffusion_lens(tiny_lens("clip"), "a red square")
    with pytest.raises(NotImplementedError, match="one CLIP text encoder"):
        diffusion_lens(tiny_lens("pixart"), "a red square")
    with pytest.raises(ValueError, match="sets \\['prompt_embeds'\\] itself"):
        diffusion_lens(tiny_lens("sd"), "a red square", prompt_embeds=None)
    with pytest.raises(ValueError, match="before the final norm"):
        diffusion_lens(tiny_lens("sd"), "a red square", names="unet.mid.out")
