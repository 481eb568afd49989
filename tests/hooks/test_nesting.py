"""Sessions that nest, exit out of order, or run in other threads (defects 1, 14, 15)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import mmlens
from mmlens.errors import LensBusyError
from mmlens.testing.tiny_models import sample_inputs
from tests.conftest import hook_counts

GEN = dict(height=32, width=32, output_type="np", progress=False)
SD_SITES = {"sd": "unet.mid.attn.0.cross.pattern", "pixart": "dit.blocks.0.cross.pattern",
            "sd3": "dit.blocks.0.joint.pattern"}


def _gen(lens, **kw):
    extra = {"use_resolution_binning": False} if lens.architecture == "pixart" else {}
    return lens.generate("a red square", **GEN, **extra, **kw)


def _state(lens):
    """Everything a session may touch: hooks per module, processors, the transformers attention table, F."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    procs = {}
    if lens.family == "diffusion":
        den = getattr(lens.model, lens.adapter.denoiser)
        procs = {k: v for k, v in den.attn_processors.items()}
    return hook_counts(lens.adapter.root()), procs, dict(ALL_ATTENTION_FUNCTIONS._local_mapping)


def test_nested_generate_counts_each_step_once(tiny_lens):
    lens = tiny_lens("sd")
    seen = []
    with lens.hooks({"unet.mid.out": lambda x, ctx: seen.append(ctx.step)}):
        _, cache = _gen(lens, num_inference_steps=3, guidance_scale=1.0, names="unet.out")
        assert cache.steps == [0, 1, 2]
        lens(prompt="a red square", num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="np")
    assert seen == [0, 1, 2, 0, 1]  # a second pipeline call inside the same block restarts at step 0


@pytest.mark.parametrize("name", ["sd", "sd_classic", "pixart", "sd3"])
def test_nested_sessions_on_one_diffusers_attention(tiny_lens, tiny_folder, name):
    """Both sessions see the same probabilities; afterwards nothing of either is left, F is torch's own, and
    transformers attention capture still works."""
    if name == "sd_classic":
        from diffusers.models.attention_processor import AttnProcessor

        lens = mmlens.load(tiny_folder("sd"))
        lens.model.unet.set_attn_processor(AttnProcessor())
    else:
        lens = tiny_lens(name)
    site = SD_SITES[name.replace("_classic", "")]
    _gen(lens, num_inference_steps=2, guidance_scale=1.0)  # transformers' own permanent hooks on a first forward
    before = _state(lens)
    outer = []
    with lens.hooks(captures={site: [lambda p, ctx: outer.append(p)]}):
        torch.manual_seed(0)
        _, cache = _gen(lens, num_inference_steps=2, guidance_scale=1.0, names=site)
    assert len(outer) == 2 and cache.steps == [0, 1]
    for t in (0, 1):
        torch.testing.assert_close(outer[t], cache.get(site, step=t), atol=0, rtol=0)
        torch.testing.assert_close(outer[t].sum(-1), torch.ones_like(outer[t].sum(-1)), atol=1e-5, rtol=0)
    assert _state(lens) == before
    import mmlens.hooks.attention as attention

    assert attention.F is F and F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    llava = tiny_lens("llava")
    _, c = llava.run_with_cache(sample_inputs("llava", llava), names="lm.blocks.0.attn.pattern")
    p = c["lm.blocks.0.attn.pattern"]
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,site", [("llava", "lm.blocks.0.attn.pattern"), ("sd", "unet.mid.attn.0.cross.pattern"),
                                       ("llava", "lm.blocks.0.mlp.out")])
def test_sessions_exited_out_of_order_leave_nothing(tiny_lens, name, site):
    lens = tiny_lens(name)
    run = (lambda: _gen(lens, num_inference_steps=2, guidance_scale=1.0)) if name == "sd" else \
        (lambda: lens(sample_inputs(name, lens)))
    run()  # transformers installs its own permanent hooks on a first forward
    before = _state(lens)
    calls = []
    one = lens.hooks({site: lambda v, ctx: calls.append(1)})
    two = lens.hooks({site: lambda v, ctx: calls.append(2)})
    one.__enter__()
    two.__enter__()
    one.__exit__(None, None, None)
    run()
    assert set(calls) == {2}  # only the open session fires
    two.__exit__(None, None, None)
    calls.clear()
    for _ in range(3):
        run()
    assert calls == [] and _state(lens) == before


def test_nested_selections_each_get_their_own(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens)
    name = "lm.blocks.1.attn.pattern"
    _, full = lens.run_with_cache(inputs, names=name)
    full = full[name]
    with lens.hooks(captures={name: [lambda p, ctx: got.append(p)]}, attn_heads=[0, 2]):
        got = []
        _, inner = lens.run_with_cache(inputs, names=name, attn_rows=[-1])
    torch.testing.assert_close(got[0], full[:, [0, 2]], atol=1e-6, rtol=0)
    torch.testing.assert_close(inner[name], full[:, :, [-1]], atol=1e-6, rtol=0)


def test_same_lens_from_another_thread_is_refused(tiny_lens):
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens)
    errors = []

    def other():
        try:
            lens(inputs)
        except LensBusyError as err:
            errors.append(str(err))

    with lens.hooks({"vision.blocks.0.resid_post": lambda x, c: None}):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1 and "another thread" in errors[0] and "one Lens per thread" in errors[0]
    t = threading.Thread(target=other)  # free again once the block is closed
    t.start()
    t.join()
    assert len(errors) == 1


def test_two_lenses_in_two_threads_capture_their_own_patterns(tiny_folder):
    """Two models (different weights) capture patterns concurrently: each equals its single-threaded result."""
    from mmlens.testing.tiny_models import build

    lenses = [mmlens.load(tiny_folder("llava")), mmlens.load(build("llava", tiny_folder("llava").parent / "llava_b", seed=1))]
    inputs = sample_inputs("llava", lenses[0], batch=2)
    names = "lm.blocks.*.attn.pattern"
    ref = [lens.run_with_cache(inputs, names=names)[1] for lens in lenses]
    bad = []

    def work(k):
        for _ in range(15):
            _, c = lenses[k].run_with_cache(inputs, names=names)
            if set(c) != set(ref[k]) or any(not torch.allclose(c[n], ref[k][n], atol=1e-6) for n in c):
                bad.append(k)

    _run_threads([(work, 0), (work, 1)])
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert bad == [] and not any("mmlens" in getattr(f, "__name__", "")
                                 for f in ALL_ATTENTION_FUNCTIONS._local_mapping.values())


def test_two_pipelines_in_two_threads_see_their_own_maps(tiny_folder):
    a, b = mmlens.load(tiny_folder("sd")), mmlens.load(tiny_folder("sd"))
    name = "unet.mid.attn.0.cross.pattern"

    def run(lens, prompt):
        return lens.generate(prompt, num_inference_steps=2, guidance_scale=1.0, names=name, generator=torch.Generator().manual_seed(0), **GEN)[1]

    ref = {"a red square": run(a, "a red square"), "a blue circle": run(b, "a blue circle")}
    bad = []

    def work(lens, prompt):
        for _ in range(4):
            c = run(lens, prompt)
            if c.steps != [0, 1] or not all(torch.allclose(c.get(name, step=t), ref[prompt].get(name, step=t), atol=1e-6)
                                            for t in (0, 1)):
                bad.append(prompt)

    _run_threads([(work, a, "a red square"), (work, b, "a blue circle")])
    assert bad == []


def _run_threads(targets):
    """Run the workers; an exception in any of them fails the test (a thread's exception is otherwise a warning)."""
    errors = []

    def wrap(fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_other_models_keep_their_own_kernels_while_a_session_is_open(tiny_lens):
    """Unhooked modules pass through unchanged: an eager model with its own eager function, a kernel called by
    keyword (as some transformers models do), and another model's forward."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as table

    hooked = tiny_lens("llava", attn_implementation="eager")
    other = tiny_lens("clip", attn_implementation="eager")
    inputs = sample_inputs("clip", other)
    ref = other(inputs).logits_per_image
    q = torch.randn(1, 2, 3, 4)
    own_calls = []

    def own_eager(module, query, key, value, attention_mask, **kw):  # e.g. Llama4's vision_eager_attention_forward
        own_calls.append(module)
        return value, None

    module = torch.nn.Linear(1, 1)
    sdpa_ref, _ = table["sdpa"](module, query=q, key=q, value=q, attention_mask=None)
    with hooked.hooks({"lm.blocks.0.attn.pattern": lambda p, c: None}), \
            tiny_lens("llava").hooks({"lm.blocks.0.attn.pattern": lambda p, c: None}):
        torch.testing.assert_close(other(inputs).logits_per_image, ref, atol=0, rtol=0)
        assert table.get_interface("eager", own_eager)(module, q, q, q, None)[0] is q and own_calls == [module]
        out, _ = table["sdpa"](module, query=q, key=q, value=q, attention_mask=None)
        torch.testing.assert_close(out, sdpa_ref, atol=0, rtol=0)
    assert "get_interface" not in vars(table) and "sdpa" not in table._local_mapping


def test_module_processor_is_tapped_and_restored(tiny_folder):
    """Processors that are nn.Modules (IP-Adapter, custom diffusion) are swapped through set_processor."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    class ModuleProcessor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = AttnProcessor2_0()

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    lens = mmlens.load(tiny_folder("sd"))
    attn = lens.sites["unet.mid.attn.0.cross.pattern"].module
    proc = ModuleProcessor()
    attn.set_processor(proc)
    _, cache = lens.generate("a red square", num_inference_steps=2, guidance_scale=1.0,
                             names="unet.mid.attn.0.cross.pattern", **GEN)
    p = cache.get("unet.mid.attn.0.cross.pattern", step=1)
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5, rtol=0)
    assert attn.processor is proc and attn._modules["processor"] is proc


def test_a_forward_that_raised_leaves_no_stale_map(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens)
    name = "lm.blocks.0.attn.pattern"

    def boom(x, ctx):
        raise RuntimeError("boom")

    got = []
    with lens.hooks({"lm.blocks.0.attn.out": boom}, captures={name: [lambda p, c: got.append(p)]}) as session:
        with pytest.raises(RuntimeError, match="boom"):
            lens(inputs)
        session.fns.pop("lm.blocks.0.attn.out")  # the same block, now without the failing hook
        lens(inputs)
    ref = lens.run_with_cache(inputs, names=name)[1][name]
    assert len(got) == 1 and got[0].shape == ref.shape
    torch.testing.assert_close(got[0], ref, atol=0, rtol=0)


def test_grad_through_a_map_also_selected_by_an_outer_session(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens)
    name = "lm.blocks.1.attn.pattern"
    with lens.hooks(captures={name: [lambda p, c: None]}, attn_rows=[-1]):
        out, cache = lens.run_with_cache(inputs, names=name, grad=True)
    (g,) = torch.autograd.grad(out.logits[:, -1].logsumexp(-1).sum(), cache[name])
    assert g.shape == cache[name].shape and g.abs().sum() > 0
