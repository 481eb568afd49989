"""Bad input gets a clear error naming the argument and what is allowed; edge cases mean what they say
(defects 4, 5, 7, 8, 13, 16)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mmlens.errors import UnknownNameError
from mmlens.testing.tiny_models import sample_image, sample_inputs

GEN = dict(height=32, width=32, output_type="np")


# ----------------------------------------------------------------------------------------------- defect 4
@pytest.mark.parametrize("arg", ["steps", "record_steps", "guidance"])
def test_step_arguments_refused_without_denoiser(tiny_lens, arg):
    lens = tiny_lens("clip")
    with pytest.raises(ValueError, match=f"{arg}: denoising steps exist only in diffusion pipelines; clip is"):
        with lens.hooks({"vision.blocks.0.resid_post": lambda x, c: x}, **{arg: [99] if arg != "guidance" else True}):
            pass


def test_steps_checked_against_num_inference_steps(tiny_lens):
    lens = tiny_lens("sd")
    with pytest.raises(ValueError, match=r"steps: step 7 is out of range for num_inference_steps=3"):
        lens.generate("a red square", num_inference_steps=3, hooks={"unet.mid.out": lambda x, c: x}, steps=[7], **GEN)
    with pytest.raises(TypeError, match="record_steps must hold ints"):
        lens.generate("a red square", num_inference_steps=3, record_steps=[0.5], names="unet.out", **GEN)
    with pytest.raises(ValueError, match="negative step -1 needs the number of steps"):
        with lens.hooks({"unet.mid.out": lambda x, c: x}, steps=[-1]):
            pass
    seen = []
    lens.generate("a red square", num_inference_steps=3, guidance_scale=1.0, steps=[-1], progress=False,
                  hooks={"unet.mid.out": lambda x, ctx: seen.append(ctx.step)}, **GEN)
    assert seen == [2]  # -1 is the last step, as in Python


def test_steps_that_never_ran_warn(tiny_lens):
    lens = tiny_lens("sd")
    with pytest.warns(UserWarning, match=r"steps: steps \[2\] never ran"):
        # img2img-like truncation is simulated by a pipeline callback that stops after two steps
        def stop(pipe, i, t, kw):
            if i == 1:
                pipe._interrupt = True
            return kw

        lens.generate("a red square", num_inference_steps=3, guidance_scale=1.0, steps=[2], progress=False,
                      hooks={"unet.mid.out": lambda x, c: x}, callback_on_step_end=stop, **GEN)


# ----------------------------------------------------------------------------------------------- defect 5
def test_negative_and_mask_rows_mean_what_python_means(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    name = "lm.blocks.1.attn.pattern"
    full = lens.run_with_cache(inputs, names=name)[1][name]
    n = full.shape[2]
    last = lens.run_with_cache(inputs, names=name, attn_rows=[-1], attn_heads=[-1])[1][name]
    torch.testing.assert_close(last, full[:, [-1]][:, :, [n - 1]], atol=1e-6, rtol=0)
    assert not torch.allclose(last[0, 0, 0, :n], torch.full((n,), 1 / n), atol=1e-3)  # not the uniform row
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[2, 5]] = True
    got = lens.run_with_cache(inputs, names=name, attn_rows=mask, attn_heads=slice(1, 3))[1][name]
    torch.testing.assert_close(got, full[:, 1:3][:, :, [2, 5]], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw,err,match", [
    (dict(attn_rows=[100]), ValueError, r"attn_rows index 100 is out of range for \d+ entries at lm.blocks.0.attn.pattern"),
    (dict(attn_rows=[0.5]), TypeError, "attn_rows must be .* it holds float"),
    (dict(attn_rows=[0, None]), TypeError, "attn_rows must be .* it holds NoneType"),
    (dict(attn_heads=2), TypeError, r"attn_heads must be .*scalar 2 \(write \[2\]"),
    (dict(attn_rows=torch.ones(3, dtype=torch.bool)), ValueError, "bool mask of length 3; it must have length"),
    (dict(attn_rows=torch.tensor([[0, 1]])), ValueError, "one-dimensional"),
    (dict(attn_rows=[]), ValueError, "selects nothing"),
    (dict(attn_heads=torch.tensor([0.0])), TypeError, "float32 tensor"),
])
def test_bad_attention_selections(tiny_lens, kw, err, match):
    lens = tiny_lens("llava")
    with pytest.raises(err, match=match):
        lens.run_with_cache(sample_inputs("llava", lens), names="lm.blocks.0.attn.pattern", **kw)


# ----------------------------------------------------------------------------------------------- defect 7
def test_hook_returning_float64_is_cast_for_model_and_cache(tiny_lens):
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens)
    name = "vision.blocks.0.resid_post"
    plain = lens.run_with_cache(inputs, names=name)[1][name]
    out, cache = lens.run_with_cache(inputs, names=name, hooks={name: lambda x, c: x.double() * 2})
    assert cache[name].dtype == torch.float32
    torch.testing.assert_close(cache[name], plain * 2)


@pytest.mark.parametrize("ret,what", [((1, 2), "tuple"), ([1.0], "list"), (np.zeros(3), "ndarray"), (1.5, "float")])
def test_hook_returning_non_tensor_names_the_site(tiny_lens, ret, what):
    lens = tiny_lens("clip")
    with pytest.raises(TypeError, match=f"hook on 'vision.blocks.0.resid_post' returned {what}; a hook returns None"):
        lens.run_with_cache(sample_inputs("clip", lens), names=[], hooks={"vision.blocks.0.resid_post": lambda x, c: ret})


def test_pattern_hook_returning_wrong_things(tiny_lens):
    lens = tiny_lens("llava")
    with pytest.raises(TypeError, match="hook on 'lm.blocks.0.attn.pattern' returned float"):
        with lens.hooks({"lm.blocks.0.attn.pattern": lambda p, c: 0.0}):
            lens(sample_inputs("llava", lens))


# ----------------------------------------------------------------------------------------------- defect 8
@pytest.mark.parametrize("make,match", [
    (lambda lens: sample_image(0), r"inputs must be a mapping of tensors .*got PIL\..*processor first"),
    (lambda lens: "a red square", "inputs must be a mapping of tensors .*got str"),
    (lambda lens: {"pixel_values": sample_image(0)}, r"inputs\['pixel_values'\] is an image"),
    (lambda lens: dict(lens.processor(text=["a red square"], images=[sample_image(0)])), "return_tensors='pt'"),
    (lambda lens: dict(lens.processor(images=[sample_image(0)], return_tensors="pt")), "needs both input_ids and pixel_values"),
    (lambda lens: {**sample_inputs("clip", lens), "pixel_values": torch.zeros(2, 3, 64, 64)}, "images of 64x64 pixels; CLIPModel takes 32x32"),
    (lambda lens: {**sample_inputs("clip", lens), "hook": 1}, "unknown keyword argument 'hook'"),
])
def test_clip_inputs_get_clear_errors(tiny_lens, make, match):
    lens = tiny_lens("clip")
    with pytest.raises((TypeError, ValueError), match=match):
        lens.run_with_cache(make(lens), names="vision.blocks.0.resid_post")


def test_misspelt_keyword_of_run_with_cache_is_refused(tiny_lens):
    lens = tiny_lens("clip")
    with pytest.raises(TypeError, match="unknown keyword argument 'hook' for CLIPModel. Did you mean"):
        lens.run_with_cache(sample_inputs("clip", lens), names=[], hook={"vision.blocks.0.resid_post": lambda x, c: x * 0})


def test_vlm_without_pixel_values_or_with_wrong_token_count(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens)
    with pytest.raises(ValueError, match="16 image tokens but no pixel_values"):
        lens({k: v for k, v in inputs.items() if k != "pixel_values"})
    two = {**inputs, "pixel_values": torch.cat([inputs["pixel_values"]] * 2)}
    with pytest.raises(ValueError, match="2 image.* of 16 tokens each need 32 image tokens in input_ids; found 16"):
        lens(two)


def test_pipeline_keyword_checked(tiny_lens):
    lens = tiny_lens("sd")
    with pytest.raises(TypeError, match="unknown keyword argument 'num_inference_step' .* Did you mean num_inference_steps"):
        lens.generate("a red square", num_inference_step=2, **GEN)


# ---------------------------------------------------------------------------------------------- defect 13
def test_generate_progress_false_hides_the_bar_and_restores_config(tiny_lens, capfd):
    lens = tiny_lens("sd")
    lens.model.set_progress_bar_config(desc="mine")
    lens.generate("a red square", num_inference_steps=3, guidance_scale=1.0, progress=False, **GEN)
    assert "3/3" not in capfd.readouterr().err
    assert lens.model._progress_bar_config == {"desc": "mine"}
    lens.generate("a red square", num_inference_steps=3, guidance_scale=1.0, **GEN)
    assert "3/3" in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------- defect 16
@pytest.mark.parametrize("names,err,match", [
    (5, TypeError, "names must be a hook-point name or glob, or a list of them; got int"),
    ([5], TypeError, "names must hold strings"),
    ("x" * 100_000, ValueError, "at most 400 are allowed"),
    ("vision.blocks.*.resid_pots", UnknownNameError, "glob matching no hook point"),
])
def test_bad_names(tiny_lens, names, err, match):
    lens = tiny_lens("clip")
    with pytest.raises(err, match=match):
        lens.run_with_cache(sample_inputs("clip", lens), names=names)


def test_generator_names_are_read_once(tiny_lens):
    lens = tiny_lens("clip")
    _, cache = lens.run_with_cache(sample_inputs("clip", lens), names=(f"vision.blocks.{i}.resid_post" for i in range(2)))
    assert list(cache) == ["vision.blocks.0.resid_post", "vision.blocks.1.resid_post"]


@pytest.mark.parametrize("fns,err,match", [
    ({None: lambda x, c: x}, TypeError, "hooks: keys must be hook-point names or globs"),
    ({"vision.blocks.0.resid_post": 3}, TypeError, r"hooks\['vision.blocks.0.resid_post'\] must be a function"),
    ({"vision.blocks.0.resid_post": []}, ValueError, "empty list"),
    ([("vision.blocks.0.resid_post", print)], TypeError, "hooks must be a dict"),
])
def test_bad_hook_maps(tiny_lens, fns, err, match):
    lens = tiny_lens("clip")
    with pytest.raises(err, match=match):
        lens.run_with_cache(sample_inputs("clip", lens), names=[], hooks=fns)


@pytest.mark.parametrize("dtype", [torch.int8, "int8", 3])
def test_cache_dtype_must_be_floating(tiny_lens, dtype):
    lens = tiny_lens("clip")
    with pytest.raises((TypeError, ValueError), match="cache_dtype"):
        lens.run_with_cache(sample_inputs("clip", lens), names="vision.blocks.0.resid_post", cache_dtype=dtype)


def test_probs_alias_warns_and_resolves(tiny_lens):
    lens = tiny_lens("sd")
    with pytest.warns(FutureWarning, match="alias of '.pattern'"):
        assert lens.hook_points("unet.mid.attn.0.cross.probs") == ["unet.mid.attn.0.cross.pattern"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lens.hook_points("unet.*.cross.pattern")


def test_token_map_inputs_checked(tiny_lens):
    lens = tiny_lens("llava")
    with pytest.raises(TypeError, match="lens.token_map: inputs must be a mapping"):
        lens.token_map(sample_image(0))
    with pytest.raises(ValueError, match="no input_ids tensor"):
        lens.token_map({"pixel_values": sample_inputs("llava", lens)["pixel_values"]})


# ------------------------------------------------------------------------------- found by benchmarks/reliability
@pytest.mark.parametrize("device,match", [("meta", "shapes without values"),
                                          pytest.param("cuda", "not usable here", marks=pytest.mark.skipif(
                                              torch.cuda.is_available(), reason="CUDA is usable here"))])
def test_cache_device_must_be_usable(tiny_lens, device, match):
    lens = tiny_lens("clip")
    with pytest.raises(ValueError, match=f"cache_device.*{match}"):
        lens.run_with_cache(sample_inputs("clip", lens), names="vision.blocks.0.resid_post", cache_device=device)


def test_pixart_guidance_branches_through_lens_call(tiny_lens):
    """PixArt keeps `do_classifier_free_guidance` in a local variable: lens(...) reads it from guidance_scale; a
    direct pipeline call gets branches None (unknown, no guess) unless lens.hooks(guidance=...) says it."""
    lens = tiny_lens("pixart")
    kw = dict(prompt="a red square", num_inference_steps=2, height=32, width=32, output_type="np",
              use_resolution_binning=False)
    seen = []
    with lens.hooks({"dit.blocks.0.resid_post": lambda x, ctx: seen.append((ctx.branches, x.shape[0]))}):
        lens(**kw, guidance_scale=5.0)
        lens(**kw, guidance_scale=1.0)
    assert seen == [(("uncond", "cond"), 2)] * 2 + [(("cond",), 1)] * 2
    with lens.hooks({"dit.blocks.0.resid_post": lambda x, ctx: seen.append(ctx.branches)}):
        lens.model(**kw, guidance_scale=5.0)  # a direct call: the pipeline does not say, so neither do we
    assert seen[-1] is None
    with lens.hooks({"dit.blocks.0.resid_post": lambda x, ctx: seen.append(ctx.branches)}, guidance=True):
        lens.model(**kw, guidance_scale=5.0)
    assert seen[-1] == ("uncond", "cond")


@pytest.mark.parametrize("steps,err", [(2.5, ValueError), ("2", ValueError), (0, ValueError)])
def test_pipeline_call_checks_num_inference_steps(tiny_lens, steps, err):
    lens = tiny_lens("sd")
    with pytest.raises(err, match="num_inference_steps must be a positive int"):
        lens(prompt="a red square", num_inference_steps=steps, height=32, width=32, output_type="np")


def test_pipeline_grad_flag_checked(tiny_lens):
    with pytest.raises(TypeError, match="grad must be True or False"):
        tiny_lens("sd").run_with_cache({"prompt": "a red square"}, names="unet.out", grad=None)


def test_qwen2_vl_inputs_checked(tiny_lens):
    lens = tiny_lens("qwen2_vl")
    x = sample_inputs("qwen2_vl", lens)
    with pytest.raises(ValueError, match="pixel_values without image_grid_thw"):
        lens({k: v for k, v in x.items() if k != "image_grid_thw"})
    with pytest.raises(ValueError, match=r"Qwen2-VL takes flattened patches \(patches, 96\)"):
        lens({**x, "pixel_values": x["pixel_values"][:, :50]})


def test_reading_patterns_with_grad_keeps_outputs_exact(tiny_lens):
    """With gradients on, recorded maps stay in the graph without moving any output, padded rows included."""
    lens = tiny_lens("qwen2_vl")
    x = sample_inputs("qwen2_vl", lens, batch=2)
    assert (x["attention_mask"] == 0).any()  # left padding: fully masked rows exist
    with torch.enable_grad():
        ref = lens(x).logits
        with lens.hooks({"lm.blocks.0.attn.pattern": lambda p, c: None}):
            got = lens(x).logits
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_guidance_said_in_hooks_must_agree_with_the_call(tiny_lens):
    lens = tiny_lens("sd")
    kw = dict(prompt="a red square", num_inference_steps=2, height=32, width=32, output_type="np")
    with pytest.raises(ValueError, match=r"lens.hooks\(guidance=True\) but this call runs without"):
        with lens.hooks({"unet.mid.out": lambda x, ctx: None}, guidance=True):
            lens(**kw, guidance_scale=1.0)
    seen = []
    with lens.hooks({"unet.mid.out": lambda x, ctx: seen.append((ctx.branches, x.shape[0]))}, guidance=True):
        lens(**kw, guidance_scale=3.0)
    assert seen == [(("uncond", "cond"), 2)] * 2


def test_guidance_of_sessions_exited_out_of_order(tiny_lens):
    """Each block's guidance= leaves with its block, whatever the order of exits."""
    lens = tiny_lens("pixart")
    kw = dict(prompt="a red square", num_inference_steps=2, height=32, width=32, output_type="np",
              use_resolution_binning=False, guidance_scale=1.0)
    seen = []
    a = lens.hooks({"dit.blocks.0.resid_post": lambda x, ctx: None}, guidance=True)
    b = lens.hooks({"dit.blocks.0.resid_post": lambda x, ctx: seen.append(ctx.branches)}, guidance=False)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    lens.model(**kw)  # a direct call: only b's word says what the batch holds
    b.__exit__(None, None, None)
    assert seen == [("cond",)] * 2


def test_numpy_steps(tiny_lens):
    seen = []
    tiny_lens("sd").generate("a red square", num_inference_steps=3, guidance_scale=1.0, steps=np.arange(1, 3),
                             hooks={"unet.mid.out": lambda x, ctx: seen.append(ctx.step)}, progress=False, **GEN)
    assert seen == [1, 2]
    with pytest.raises(TypeError, match="steps must hold ints"):
        tiny_lens("sd").generate("a red square", num_inference_steps=3, steps=[torch.tensor(1.0)], **GEN)
def test_misspelt_keyword_of_hooks_is_named_with_its_correction(tiny_lens):
    with pytest.raises(TypeError, match="lens.hooks: unknown keyword argument 'attn_head'. Did you mean attn_heads"):
        tiny_lens("clip").hooks({"vision.blocks.0.resid_post": lambda x, c: None}, attn_head=[0]).__enter__()


def test_numpy_selections(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens)
    name = "lm.blocks.0.attn.pattern"
    full = lens.run_with_cache(inputs, names=name)[1][name]
    mask = np.zeros(full.shape[2], dtype=bool)
    mask[[1, 3]] = True
    got = lens.run_with_cache(inputs, names=name, attn_rows=mask, attn_heads=np.array([0, -1]))[1][name]
    torch.testing.assert_close(got, full[:, [0, 3]][:, :, [1, 3]], atol=1e-6, rtol=0)
