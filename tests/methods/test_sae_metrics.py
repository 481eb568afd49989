"""SAE metrics against hand computation on tiny models: reconstruction numbers from the raw activations, the
downstream loss from the model's own outputs, and the identity / zero SAEs that pin spliced to clean / zero."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from matplotlib.figure import Figure

from mmlens.errors import UnknownNameError
from mmlens.methods.result import Result
from mmlens.methods.sae_metrics import SAEMetricsResult, sae_metrics
from mmlens.testing.tiny_models import sample_image, sample_inputs
from tests.methods.test_sae_splice import by_hand, identity_sae, random_sae, zero_sae

matplotlib.use("Agg")
CLASSES = ["a photo of a red square", "a blue circle", "a green triangle"]


def hand_stats(X: torch.Tensor, sae, dense: float = 0.1) -> dict:
    X = X.double()
    f, xh = by_hand(X.float(), sae)
    xh = xh.double()
    rate = (f != 0).double().mean(0)
    return {"explained_variance": float(1 - ((X - xh) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()),
            "mse": float(((X - xh) ** 2).mean()),
            "cosine": float(torch.nn.functional.cosine_similarity(X, xh, dim=-1).mean()),
            "l0": float((f != 0).sum(1).double().mean()), "dead_fraction": float((rate == 0).double().mean()),
            "dense_fraction": float((rate > dense).double().mean()), "n_tokens": X.shape[0]}


def check_stats(res: SAEMetricsResult, want: dict) -> None:
    for k, v in want.items():
        assert getattr(res, k) == pytest.approx(v, rel=1e-5, abs=1e-6), k


# ------------------------------------------------------------------------------------------- contrastive
def clip_batches(lens):
    return [sample_inputs("clip", lens, batch=2, seed=s) for s in (0, 2)]


def test_clip_reconstruction_and_zero_shot(tiny_lens):
    lens = tiny_lens("clip")
    site = "vision.blocks.0.resid_post"
    batches = clip_batches(lens)
    X = torch.cat([lens.run_with_cache(b, names=site)[1][site].flatten(0, 1) for b in batches])
    sae = random_sae(64, hook_name=site, seed=1)
    with torch.no_grad():
        sae.b_enc[:8] = -100.0  # never fire: dead
    labels = torch.tensor([0, 1, 2, 1])
    res = sae_metrics(lens, sae, batches, classes=CLASSES, labels=labels, progress=False)
    check_stats(res, hand_stats(X, sae))
    assert res.n_tokens == 4 * 17  # 4 images x (16 patches + CLS)
    assert res.dead_fraction == 8 / 32 and 0 < res.dense_fraction < 1
    # zero-shot accuracy by hand: embeddings from the model, clean and with the site zeroed by a plain hook
    from mmlens.methods.splice import image_embeddings
    from mmlens.methods.textspan import encode_texts

    _, T = encode_texts(lens, CLASSES)
    img = torch.cat([image_embeddings(lens, b) for b in batches])
    clean = float(((img @ T.T).argmax(-1) == labels).float().mean())
    h = lens.sites[site].module.register_forward_hook(lambda m, a, o: (torch.zeros_like(o[0]), *o[1:])
                                                      if isinstance(o, tuple) else torch.zeros_like(o))
    try:
        zimg = torch.cat([image_embeddings(lens, b) for b in batches])
    finally:
        h.remove()
    zero = float(((zimg @ T.T).argmax(-1) == labels).float().mean())
    d = res.downstream
    assert d["metric"] == "zero_shot_accuracy" and d["clean"] == clean and d["zero"] == zero
    assert d["images"] == 4 and d["classes"] == CLASSES
    # the identity SAE: exact reconstruction, the same accuracy as clean
    ident = sae_metrics(lens, identity_sae(64, site), batches, classes=CLASSES, labels=labels, progress=False)
    assert ident.explained_variance == pytest.approx(1.0, abs=1e-12) and ident.mse == 0.0
    assert ident.cosine == pytest.approx(1.0, abs=1e-6) and ident.l0 == 64.0  # one of relu(x), relu(-x) per dim
    assert ident.downstream["spliced"] == clean
    if zero != clean:
        assert ident.recovered == 1.0


def test_clip_pixel_only_batches_and_text_site(tiny_lens):
    """Batches of images only reach a vision site through the image tower; a text site needs input_ids."""
    lens = tiny_lens("clip")
    site = "vision.blocks.1.resid_post"
    pix = [{"pixel_values": b["pixel_values"]} for b in clip_batches(lens)]
    X = torch.cat([lens.run_with_cache(b, names=site)[1][site].flatten(0, 1) for b in clip_batches(lens)])
    sae = random_sae(64, hook_name=site, seed=2)
    res = sae_metrics(lens, sae, pix, progress=False)
    check_stats(res, hand_stats(X, sae))
    assert res.downstream is None  # no classes: reconstruction only
    with pytest.raises(ValueError, match="does not reach 'text.blocks.0.resid_post'"):
        sae_metrics(lens, random_sae(64, hook_name="text.blocks.0.resid_post"), pix, progress=False)
    # text site: real tokens under the attention mask only
    tsite = "text.blocks.0.resid_post"
    batches = clip_batches(lens)
    rows = []
    for b in batches:
        v = lens.run_with_cache(b, names=tsite)[1][tsite]
        rows.append(v[b["attention_mask"].bool()])
    tsae = random_sae(64, hook_name=tsite, seed=3)
    check_stats(sae_metrics(lens, tsae, batches, progress=False), hand_stats(torch.cat(rows), tsae))


# -------------------------------------------------------------------------------------------- generative
def hand_ce(lens, batches, hooks=None) -> float:
    total, n = 0.0, 0
    for b in batches:
        with torch.no_grad(), lens.hooks(hooks or {}):
            logits = lens(b).logits
        tm = lens.token_map(b)
        am = b["attention_mask"].bool()
        keep = am[:, 1:] & am[:, :-1] & (tm.modality[:, 1:] == 0)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), b["input_ids"][:, 1:][keep],
                                               reduction="sum")
        total, n = total + float(ce), n + int(keep.sum())
    return total / n


def test_llava_cross_entropy(tiny_lens):
    lens = tiny_lens("llava")
    site = "lm.blocks.0.resid_post"
    batches = [sample_inputs("llava", lens, batch=2, seed=s) for s in (0, 5)]
    clean = hand_ce(lens, batches)
    zero = hand_ce(lens, batches, {site: lambda v, ctx: torch.zeros_like(v)})
    ident = sae_metrics(lens, identity_sae(64, site), batches, progress=False)
    d = ident.downstream
    assert d["metric"] == "cross_entropy"
    assert d["clean"] == pytest.approx(clean, rel=1e-6) and d["zero"] == pytest.approx(zero, rel=1e-6)
    assert d["spliced"] == d["clean"] and ident.recovered == 1.0
    assert ident.explained_variance == pytest.approx(1.0, abs=1e-12)
    # targets: text tokens whose predecessor is real ('<image>' placeholders, '<s>', padding are not predicted)
    want = 0
    for b in batches:
        am = b["attention_mask"].bool()
        want += int(((lens.token_map(b).modality[:, 1:] == 0) & am[:, 1:] & am[:, :-1]).sum())
    assert d["tokens"] == want and 0 < want < int(sum(b["attention_mask"].sum() for b in batches))
    zs = sae_metrics(lens, zero_sae(64, site), batches, progress=False)
    assert zs.downstream["spliced"] == pytest.approx(zs.downstream["zero"], rel=1e-6)
    assert zs.recovered == pytest.approx(0.0, abs=1e-6)
    assert zs.explained_variance < 0  # x_hat = 0 explains less than the mean does
    # reconstruction over real tokens of the LM (padding excluded), a random SAE
    rows = [lens.run_with_cache(b, names=site)[1][site][b["attention_mask"].bool()] for b in batches]
    sae = random_sae(64, hook_name=site, seed=5)
    res = sae_metrics(lens, sae, batches, progress=False)
    check_stats(res, hand_stats(torch.cat(rows), sae))
    spliced = hand_ce(lens, batches, {site: lambda v, ctx: by_hand(v, sae)[1]})
    assert res.downstream["spliced"] == pytest.approx(spliced, rel=1e-5) and abs(spliced - clean) > 1e-4


def test_llava_cross_entropy_on_labels(tiny_lens):
    """A batch with HF `labels` is scored on the labelled targets only (here the last token of each row, as an
    answer), with the labels as the target ids; other positions and the model's own loss play no part."""
    lens = tiny_lens("llava")
    site = "lm.blocks.0.resid_post"
    b = sample_inputs("llava", lens, batch=2, seed=0)
    labels = torch.full_like(b["input_ids"], -100)
    labels[:, -1] = b["input_ids"][:, -1]
    labels[0, -1] = (labels[0, -1] + 1) % lens.model.config.text_config.vocab_size  # a target the input does not hold
    with torch.no_grad():
        logits = lens(b).logits
    want = float(torch.nn.functional.cross_entropy(logits[:, -2].float(), labels[:, -1]))
    got = sae_metrics(lens, identity_sae(64, site), [dict(b, labels=labels)], progress=False).downstream
    assert got["clean"] == pytest.approx(want, rel=1e-6) and got["tokens"] == 2
    with pytest.raises(ValueError, match="labels have shape"):
        sae_metrics(lens, identity_sae(64, site), [dict(b, labels=labels[:, 1:])], progress=False)


def test_llava_vision_site_changes_the_lm_loss(tiny_lens):
    lens = tiny_lens("llava")
    site = "vision.blocks.0.resid_post"
    batches = [sample_inputs("llava", lens, batch=2)]
    res = sae_metrics(lens, zero_sae(64, site), batches, progress=False)
    assert res.downstream["spliced"] == pytest.approx(res.downstream["zero"], rel=1e-6)
    assert res.n_tokens == 2 * 17  # vision tokens: no attention mask applies


# --------------------------------------------------------------------------------------------- diffusion
def hand_denoise(lens, prompts, x0, ts, seed, hooks=None) -> float:
    pipe = lens.model
    g = torch.Generator().manual_seed(seed)
    noise = [torch.randn(x0.shape, generator=g) for _ in ts]
    total, n = 0.0, 0
    with torch.no_grad(), lens.hooks(hooks or {}):
        emb = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
        for t, eps in zip(ts, noise):
            a = pipe.scheduler.alphas_cumprod[t]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
            pred = pipe.unet(xt, torch.full((len(x0),), t), encoder_hidden_states=emb).sample
            total, n = total + float(((pred - eps) ** 2).sum()), n + eps.numel()
    return total / n


def test_sd_denoising_loss(tiny_lens):
    lens = tiny_lens("sd")
    site = "unet.mid.out"
    prompts = ["a red square", "a blue circle", "a green square"]
    x0 = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    ts = [50, 600]
    clean = hand_denoise(lens, prompts, x0, ts, seed=3)
    zero = hand_denoise(lens, prompts, x0, ts, seed=3, hooks={site: lambda v, ctx: torch.zeros_like(v)})
    res = sae_metrics(lens, identity_sae(64, site), prompts, latents=x0, timesteps=ts, seed=3, batch_size=2,
                      progress=False)
    d = res.downstream
    assert d["metric"] == "denoising_mse" and d["target"] == "epsilon" and d["timesteps"] == ts
    assert d["clean"] == pytest.approx(clean, rel=1e-5) and d["zero"] == pytest.approx(zero, rel=1e-5)
    assert d["spliced"] == d["clean"] and res.recovered == 1.0
    assert res.n_tokens == 3 * len(ts) * 8 * 8  # an (8, 8) mid-block map per prompt and timestep
    assert set(d["per_timestep"]) == {"50", "600"}
    zs = sae_metrics(lens, zero_sae(64, site), prompts, latents=x0, timesteps=ts, seed=3, progress=False)
    assert zs.downstream["spliced"] == pytest.approx(zero, rel=1e-5) and zs.recovered == pytest.approx(0, abs=1e-6)
    # without latents: the pipeline's own samples; reconstruction only with downstream=False
    own = sae_metrics(lens, identity_sae(64, site), prompts[:1], timesteps=[500], downstream=False, progress=False,
                      generate_kwargs=dict(num_inference_steps=2, height=32, width=32))
    assert own.downstream is None and own.n_tokens == 64 and own.explained_variance == pytest.approx(1, abs=1e-12)


@pytest.mark.parametrize("tiny", ["pixart", "sd3"])
def test_transformer_denoisers(tiny_lens, tiny):
    """PixArt (epsilon, learned-variance half dropped) and SD3 (rectified flow: target eps - x0): the identity SAE
    gives the clean loss, the zero SAE the zero-ablated one; SD3's clean loss by hand."""
    lens = tiny_lens(tiny)
    site = "dit.blocks.0.resid_post"
    prompts = ["a red square", "a blue circle"]
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(latents=x0, timesteps=[300], seed=0, progress=False)
    ident = sae_metrics(lens, identity_sae(32, site), prompts, **kw).downstream
    zero = sae_metrics(lens, zero_sae(32, site), prompts, **kw).downstream
    assert ident["spliced"] == ident["clean"] and zero["spliced"] == pytest.approx(zero["zero"], rel=1e-6)
    assert abs(zero["zero"] - zero["clean"]) > 1e-4
    if tiny == "sd3":
        pipe = lens.model
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            emb, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
            xt = 0.7 * x0 + 0.3 * eps
            pred = pipe.transformer(hidden_states=xt, timestep=torch.full((2,), 300.0), encoder_hidden_states=emb,
                                    pooled_projections=pooled).sample
        assert ident["clean"] == pytest.approx(float(((pred - (eps - x0)) ** 2).mean()), rel=1e-5)
        assert ident["target"] == "flow"


def test_store_equals_inputs(tiny_lens, tmp_path):
    """Reconstruction over an ActivationStore of the site equals the same tokens read from a forward pass."""
    from mmlens.store import write_activations

    lens = tiny_lens("llava")
    site = "lm.blocks.1.resid_post"
    texts = ["<image> what colour is the square ?", "<image> is there a red circle on the left ?"]
    imgs = [sample_image(s) for s in range(2)]
    store = write_activations(lens, [{"image": i, "text": t} for i, t in zip(imgs, texts)], names=site,
                              folder=tmp_path / "acts", dtype="float32", progress=False)
    batch = dict(lens.processor(text=texts, images=imgs, return_tensors="pt", padding=True))
    sae = random_sae(64, hook_name=site, seed=6)
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    on_store = sae_metrics(lens, sae, store, progress=False)
    on_inputs = sae_metrics(lens, sae, [batch], downstream=False, progress=False)
    assert on_store.n_tokens == on_inputs.n_tokens == int(batch["attention_mask"].sum())
    for k in ("explained_variance", "mse", "cosine", "l0", "dead_fraction", "dense_fraction"):
        assert getattr(on_store, k) == pytest.approx(getattr(on_inputs, k), rel=1e-4, abs=1e-6), k
    both = sae_metrics(lens, sae, [batch], store=store, progress=False)  # reconstruction: store; loss: inputs
    assert both.meta["source"] == "store" and both.downstream["metric"] == "cross_entropy"
    assert both.explained_variance == on_store.explained_variance
    with pytest.raises(ValueError, match="the store holds \\['lm.blocks.1.resid_post'\\], not the SAE's site"):
        sae_metrics(lens, random_sae(64, hook_name="lm.blocks.0.resid_post"), store, progress=False)
    with pytest.raises(ValueError, match="has 64 features per token in the store; this SAE reads d_in=32"):
        sae_metrics(lens, random_sae(32, hook_name=site), store, progress=False)


# ------------------------------------------------------------------------------------ result and errors
def test_save_load_plot_html(tmp_path, tiny_lens):
    lens = tiny_lens("clip")
    site = "vision.blocks.0.resid_post"
    res = sae_metrics(lens, random_sae(64, hook_name=site), clip_batches(lens), classes=CLASSES,
                      labels=[0, 1, 2, 0], progress=False)
    back = Result.load(res.save(tmp_path / "m"))
    assert isinstance(back, SAEMetricsResult)
    for f in ("name", "n_tokens", "explained_variance", "mse", "cosine", "l0", "dead_fraction", "dense_fraction",
              "downstream", "meta"):
        assert getattr(back, f) == getattr(res, f), f
    assert torch.equal(back.fire_rate, res.fire_rate)
    assert isinstance(res.plot(), Figure)
    html = res._repr_html_()
    assert "explained_variance" in html and "zero_shot_accuracy" in html and "<img" in html
    assert len(res.dead_features) == int(round(res.dead_fraction * 32))


def test_errors(tiny_lens):
    lens = tiny_lens("clip")
    batches = clip_batches(lens)
    site = "vision.blocks.0.resid_post"
    with pytest.raises(ValueError, match=r"'vision.blocks.0.resid_post' has 64 features per token; this SAE reads "
                                         r"d_in=32"):
        sae_metrics(lens, random_sae(32, hook_name=site), batches, progress=False)
    with pytest.raises(UnknownNameError, match="vision.blocks.7.resid_post"):
        sae_metrics(lens, random_sae(64, hook_name="vision.blocks.7.resid_post"), batches, progress=False)
    with pytest.raises(ValueError, match="matches 2 sites"):
        sae_metrics(lens, random_sae(64), batches, name="vision.blocks.*.resid_post", progress=False)
    with pytest.raises(ValueError, match="give both or neither"):
        sae_metrics(lens, random_sae(64, hook_name=site), batches, classes=CLASSES, progress=False)
    with pytest.raises(ValueError, match="labels: one class index per image; the batches hold 4 images, labels 2"):
        sae_metrics(lens, random_sae(64, hook_name=site), batches, classes=CLASSES, labels=[0, 1], progress=False)
    with pytest.raises(ValueError, match="latents: the denoising loss is for diffusion"):
        sae_metrics(lens, random_sae(64, hook_name=site), batches, latents=torch.zeros(1, 4, 2, 2), progress=False)
    with pytest.raises(ValueError, match="nothing to measure on"):
        sae_metrics(lens, random_sae(64, hook_name=site), progress=False)
    with pytest.raises(ValueError, match="dense_threshold=2"):
        sae_metrics(lens, random_sae(64, hook_name=site), batches, dense_threshold=2, progress=False)
    with pytest.raises(TypeError, match="processor output"):
        sae_metrics(lens, random_sae(64, hook_name=site), [sample_image()], progress=False)
    sd = tiny_lens("sd")
    with pytest.raises(ValueError, match=r"timesteps=\[1000\]: give training timesteps, ints in \[0, 1000\)"):
        sae_metrics(sd, random_sae(64, hook_name="unet.mid.out"), ["a"], latents=torch.zeros(1, 4, 16, 16),
                    timesteps=[1000], progress=False)
    with pytest.raises(ValueError, match=r"one per prompt \(2\)"):
        sae_metrics(sd, random_sae(64, hook_name="unet.mid.out"), ["a", "b"], latents=torch.zeros(1, 4, 16, 16),
                    progress=False)
