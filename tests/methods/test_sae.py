"""SAE estimators: sparse kernels against the dense reference, training of every architecture, recovery of a known
sparse dictionary, resume after a kill, mmlens and SAELens formats both ways, data sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmlens.methods import _sae_kernels as K
from mmlens.methods._sae_fit import explained_variance, losses
from mmlens.methods.sae import SAE, SAEConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def dictionary_data(d=32, atoms=64, k=3, seed=0):
    """Tokens that are each a positive sum of k of `atoms` random unit directions; returns (atoms, step -> batch)."""
    A = F.normalize(torch.randn(atoms, d, generator=torch.Generator().manual_seed(seed)), dim=1)

    def batch(step: int, n: int = 512) -> torch.Tensor:
        g = torch.Generator().manual_seed(10_000 * seed + step)
        idx = torch.rand(n, atoms, generator=g).topk(k).indices
        coef = torch.rand(n, k, generator=g) + 0.5
        return (coef[:, :, None] * A[idx]).sum(1)
    return A, batch


# ------------------------------------------------------------------------------------------------- kernels
def ragged(n=5, d_sae=7, counts=(2, 0, 3, 1, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = torch.cat([torch.randperm(d_sae, generator=g)[:c] for c in counts])
    counts_t = torch.tensor(counts)
    return torch.cumsum(counts_t, 0) - counts_t, cols


def test_sparse_encode_gradcheck_and_dense_equality():
    offsets, cols = ragged()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, W, b: K.sparse_encode(x, W, b, offsets, cols), (x, W, b))
    # the dense reference: the full pre-activation matrix, read at the kept entries
    rows = K.bag_rows(offsets, len(cols))
    assert rows.tolist() == [0, 0, 2, 2, 2, 3, 4, 4]
    dense = (x @ W + b)[rows, cols]
    wsum = torch.randn(len(cols), generator=g, dtype=torch.float64)
    ref = torch.autograd.grad((dense * wsum).sum(), (x, W, b))
    pre = (x @ W + b).detach()[rows, cols]  # values precomputed (as topk_pre gives them): same grads
    got = torch.autograd.grad((K.sparse_encode(x, W, b, offsets, cols, pre) * wsum).sum(), (x, W, b))
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)


def test_sparse_decode_gradcheck_and_dense_equality():
    offsets, cols = ragged()
    g = torch.Generator().manual_seed(2)
    v = torch.randn(len(cols), generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, W: K.sparse_decode(v, offsets, cols, W), (v, W))
    code = torch.zeros(5, 7, dtype=torch.float64).index_put((K.bag_rows(offsets, len(cols)), cols), v)
    out = K.sparse_decode(v, offsets, cols, W)
    torch.testing.assert_close(out, code @ W)
    assert out[1].abs().max() == 0  # the empty bag


@pytest.mark.parametrize("dense", [False, True])
def test_sparse_ops_shift_and_dense_backed_path(monkeypatch, dense):
    """The encoder's shift (b_dec) gradient and the dense-matmul path that GPUs in bf16 take (forced here on CPU)
    give the gradients of the plain dense formula."""
    monkeypatch.setattr(K, "dense_backed", lambda t: dense)
    offsets, cols = ragged()
    rows = K.bag_rows(offsets, len(cols))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    W, b = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((4, 7), (7,)))
    shift = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    seed = torch.randn(5, 4, generator=g, dtype=torch.float64)

    def ref():
        code = torch.zeros(5, 7, dtype=torch.float64).index_put((rows, cols), ((x - shift) @ W + b)[rows, cols].relu())
        return code @ W_dec

    def got(x_grad=False):
        vals = K.sparse_encode(x, W, b, offsets, cols, shift=shift)
        return K.sparse_decode(vals.relu(), offsets, cols, W_dec)

    params = (W, b, shift, W_dec)
    want = torch.autograd.grad((ref() * seed).sum(), params)
    have = torch.autograd.grad((got() * seed).sum(), params)
    for o, r in zip(have, want):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, W, s: K.sparse_encode(x, W, b, offsets, cols, shift=s),
                                    (x.clone().requires_grad_(True), W, shift))
    widths = [3, 7]
    vals = K.sparse_encode(x, W, b, offsets, cols, shift=shift).relu()
    code = torch.zeros(5, 7, dtype=torch.float64).index_put((rows, cols), vals)
    torch.testing.assert_close(K.prefix_decode(vals, offsets, cols, W_dec, widths),
                               K.prefix_decode_dense(code, W_dec, widths), rtol=1e-12, atol=1e-12)


def test_topk_pre_matches_torch_topk_in_chunks(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x, W, b = torch.randn(100, 8, generator=g), torch.randn(8, 64, generator=g), torch.randn(64, generator=g)
    monkeypatch.setattr(K, "CHUNK_ELEMENTS", 64 * 7)  # 7 rows a chunk: 15 chunks, the last partial
    v, i = K.topk_pre(x, W, b, 5)
    rv, ri = (x @ W + b).topk(5)
    torch.testing.assert_close(v.sort(-1).values, rv.sort(-1).values)
    assert torch.equal(i.sort(-1).values, ri.sort(-1).values)


def test_jumprelu_and_step_pseudo_gradients_by_hand():
    z = torch.tensor([[0.5, 1.0, 1.02], [1.5, 0.96, 0.9]], requires_grad=True)
    t = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    out = K.JumpReLU.apply(z, t, 0.1)
    assert out.tolist() == [[0.0, 0.0, pytest.approx(1.02)], [1.5, 0.0, 0.0]]
    out.sum().backward()
    # rect((z - t) / 0.1) is 1 where |z - t| < 0.05: (0,1), (0,2), (1,1); d/dt = -(t / bw) per hit
    assert z.grad.tolist() == [[0, 0, 1], [1, 0, 0]]
    torch.testing.assert_close(t.grad, torch.tensor([0.0, -20.0, -10.0]))
    t.grad = None
    z2 = z.detach().requires_grad_()
    l0 = K.Step.apply(z2, t, 0.1)
    assert l0.tolist() == [[0, 0, 1], [1, 0, 0]]
    l0.sum().backward()
    torch.testing.assert_close(t.grad, torch.tensor([0.0, -20.0, -10.0]))  # -(1 / bw) per hit, t = 1
    assert z2.grad is None or z2.grad.abs().max() == 0


def dense_reference_loss(sae, x, dead=None):
    """The plain dense TopK / BatchTopK objective, autograd everywhere (mse + AuxK on the dead features)."""
    cfg = sae.cfg
    target = x * sae.input_scale
    pre = (target - sae.b_dec) @ sae.W_enc + sae.b_enc
    if cfg.architecture == "topk":
        vals, idx = pre.topk(cfg.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))
    else:
        flat = F.relu(pre).reshape(-1)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(cfg.k * x.shape[0]).indices] = True
        f = F.relu(pre) * keep.view_as(pre)
    recon = f @ sae.W_dec + sae.b_dec
    loss = (recon - target).pow(2).sum(-1).mean()
    return loss + aux_reference(sae, pre, target, recon, dead)


def aux_reference(sae, pre, target, recon, dead):
    """AuxK by hand: the top aux_k dead pre-activations per token, decoded densely, fit to the residual."""
    cfg = sae.cfg
    if dead is None or not dead.any():
        return 0.0
    n_dead = int(dead.sum())
    v, i = torch.where(dead, pre, -torch.inf).topk(min(cfg.aux_k, n_dead), dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, i, v) @ sae.W_dec
    aux = (e_hat - (target - recon).detach()).pow(2).sum(-1).mean()
    return cfg.aux_coefficient * min(n_dead / cfg.aux_k, 1) * aux


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("aux_dense_share", [0.0, float("inf")])  # AuxK's dense path, its gather kernels
def test_sparse_step_gradients_equal_the_dense_step(arch, aux_dense_share, monkeypatch):
    import mmlens.methods._sae_fit as fit

    monkeypatch.setattr(fit, "AUX_DENSE_SHARE", aux_dense_share)
    cfg = SAEConfig(d_in=16, d_sae=96, architecture=arch, k=5, aux_k=12)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 16, generator=g)
    sae = SAE(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(16, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(96, generator=g))
        sae.input_scale.fill_(1.7)
    dead = torch.rand(96, generator=g) < 0.3
    for d in (None, dead):
        for p in sae.parameters():
            p.grad = None
        losses(sae, x, d)["loss"].backward()
        got = {n: p.grad.clone() for n, p in sae.named_parameters()}
        for p in sae.parameters():
            p.grad = None
        dense_reference_loss(sae, x, d).backward()
        for n, p in sae.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5,
                                       msg=f"{arch} grad {n} (dead={d is not None})")


# ------------------------------------------------------------------------------------------------ training
def test_topk_recovers_a_known_sparse_dictionary():
    A, batch = dictionary_data()
    cfg = SAEConfig(d_in=32, d_sae=128, architecture="topk", k=3, lr=3e-3, batch_size=512, warmup_steps=20,
                    dead_tokens=20_000, aux_k=32)
    sae = SAE(cfg).fit(batch, steps=400, progress=False)
    sim = (A @ sae.W_dec.T).max(1).values
    assert sim.mean() >= 0.9, f"mean max-cosine {sim.mean():.3f}"
    x = batch(99_999)
    assert explained_variance(sae(x), x) > 0.9
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)
    st = sae.feature_stats
    assert st["tokens"] == 400 * 512 and st["steps"] == 400
    assert int(st["fire_count"].sum()) <= 3 * 400 * 512 and st["frequency"].max() <= 1
    # input_scale: the mean input norm becomes sqrt(d_in)
    assert float((x * sae.input_scale).norm(dim=1).mean()) == pytest.approx(32 ** 0.5, rel=0.05)


@pytest.mark.parametrize("arch", ["relu", "batchtopk", "jumprelu"])
def test_other_architectures_train(arch):
    _, batch = dictionary_data(d=16, atoms=32, seed=1)
    cfg = SAEConfig(d_in=16, d_sae=64, architecture=arch, k=3, lr=3e-3, batch_size=256, warmup_steps=10,
                    dead_tokens=10_000, aux_k=16, l1_coefficient=0.3, l0_coefficient=0.5, jumprelu_bandwidth=0.05,
                    jumprelu_init_threshold=0.1)
    sae = SAE(cfg)
    x = batch(99_999)
    ev0 = explained_variance(sae(x), x)
    sae.fit(batch, steps=300, progress=False)
    f = sae.encode(x)
    l0 = float((f > 0).float().sum(1).mean())
    assert explained_variance(sae.decode(f), x) > max(0.75, ev0 + 0.3)
    if arch == "batchtopk":  # inference: one global threshold, about k per token on average
        assert float(sae.batch_threshold) > 0 and 1.5 < l0 < 6
    if arch == "jumprelu":  # the L0 penalty moved the thresholds up from their init
        assert float(sae.threshold.mean()) > 0.1 and l0 < 20
    if arch == "relu":
        assert l0 < 40


def test_jumprelu_l0_coefficient_does_not_throttle_the_reconstruction():
    """The L0 term reaches only the thresholds, and they are left out of the norm clip: the reconstruction's
    parameters follow the same path whatever l0_coefficient is (with them in the clip, a large one shrank every
    other gradient and the SAE ended with a larger L0)."""
    from mmlens.methods._sae_fit import Trainer

    _, batch = dictionary_data(d=16, atoms=32, seed=3)
    got = []
    for coef in (1.0, 1000.0):
        cfg = SAEConfig(d_in=16, d_sae=64, architecture="jumprelu", lr=3e-3, batch_size=256, warmup_steps=0,
                        l0_coefficient=coef, jumprelu_bandwidth=0.05, jumprelu_init_threshold=0.1, aux_k=0)
        sae = SAE(cfg)
        trainer = Trainer(sae, total=5)
        trainer.initialise(batch(0))
        norms = []
        for i in range(5):
            trainer.step(i, batch(i))
            norms.append(float(sae.log_threshold.grad.norm()))
        got.append({n: p.detach().clone() for n, p in sae.named_parameters()})
    assert max(norms) > 10  # at 1000 the thresholds' gradient alone would have set the clip factor
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(got[0][name], got[1][name], msg=name)


@pytest.mark.parametrize("widths", [None, [2, 8, 32]], ids=["plain", "matryoshka"])
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_resume_after_a_kill_gives_the_same_weights(tmp_path, arch, widths):
    _, batch = dictionary_data(d=8, atoms=16, seed=2)
    cfg = SAEConfig(d_in=8, d_sae=32, architecture=arch, k=2, lr=1e-2, batch_size=64, warmup_steps=3,
                    dead_tokens=128, aux_k=4, matryoshka_widths=widths)

    def killed(step):
        if step == 9:
            raise RuntimeError("killed")
        return batch(step, 64)

    with pytest.raises(RuntimeError, match="killed"):
        SAE(cfg).fit(killed, steps=14, work=tmp_path / "run", every=4, progress=False)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 8
    resumed = SAE(cfg).fit(lambda s: batch(s, 64), steps=14, work=tmp_path / "run", every=4, progress=False)
    straight = SAE(cfg).fit(lambda s: batch(s, 64), steps=14, progress=False)
    for (n, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(a, b), n
    for key in ("fire_count", "tokens_since_fired"):
        assert torch.equal(resumed.feature_stats[key], straight.feature_stats[key])
    assert resumed.feature_stats["tokens"] == straight.feature_stats["tokens"] == 14 * 64
    with pytest.raises(ValueError, match="another SAEConfig"):
        SAE(SAEConfig(**{**cfg.__dict__, "lr": 0.5})).fit(batch, steps=14, work=tmp_path / "run", progress=False)
    other = SAEConfig(**{**cfg.__dict__, "matryoshka_widths": [4, 32]})  # the widths are part of the run's config
    with pytest.raises(ValueError, match=r"another SAEConfig \(differs in \['matryoshka_widths'\]\)"):
        SAE(other).fit(batch, steps=14, work=tmp_path / "run", progress=False)


def test_fit_input_errors():
    sae = SAE(SAEConfig(d_in=8, d_sae=16, k=2, batch_size=4))
    with pytest.raises(ValueError, match="a callable data source needs steps= or tokens="):
        sae.fit(lambda s: torch.randn(4, 8), progress=False)
    with pytest.raises(ValueError, match="an iterable data source needs steps= or tokens="):
        sae.fit(iter([torch.randn(4, 8)]), progress=False)
    with pytest.raises(ValueError, match="expected a \\(tokens, d_in=8\\) tensor"):
        sae.fit([torch.randn(4, 9)], progress=False)
    with pytest.raises(TypeError, match="ActivationStore, an iterable"):
        sae.fit(3, steps=2, progress=False)
    with pytest.raises(ValueError, match="apply to an ActivationStore only"):
        sae.fit([torch.randn(4, 8)], where={"modality": "image"}, progress=False)
    with pytest.raises(ValueError, match="pass name="):
        sae.fit([{"a": torch.randn(4, 8), "b": torch.randn(4, 8)}], progress=False)
    with pytest.raises(ValueError, match="tokens= or steps=, not both"):
        sae.fit([torch.randn(4, 8)], tokens=8, steps=2, progress=False)
    with pytest.raises(ValueError, match="architecture='gated'"):
        SAEConfig(d_in=8, d_sae=16, architecture="gated")
    with pytest.raises(ValueError, match="lr_schedule"):
        SAEConfig(d_in=8, d_sae=16, k=2, lr_schedule="linear")
    with pytest.warns(UserWarning, match="ran out after 2 of 5"):
        sae.fit([torch.randn(4, 8), torch.randn(4, 8)], steps=5, progress=False)


def test_fit_reads_an_activation_store(tmp_path):
    pytest.importorskip("mmlens.store")
    from mmlens.store.synthetic import write_synthetic

    store = write_synthetic(tmp_path / "acts", tokens=2048, d=8, dtype="float32", shard_tokens=512)
    name = store.names[0]
    cfg = SAEConfig(d_in=8, d_sae=16, k=2, batch_size=256, warmup_steps=2)
    sae = SAE(cfg).fit(store, progress=False)  # default: one pass
    assert sae.cfg.hook_name == name and sae.feature_stats["steps"] == 2048 // 256
    assert sae.feature_stats["tokens"] == 2048
    sae2 = SAE(SAEConfig(d_in=8, d_sae=16, k=2, batch_size=256, warmup_steps=2)).fit(
        store, tokens=5000, where={"modality": "image"}, progress=False)  # several passes over the image tokens
    assert sae2.feature_stats["tokens"] == (5000 // 256) * 256
    with pytest.raises(ValueError, match="not in the store"):
        SAE(cfg).fit(store, name="vision.blocks.0.resid_post", progress=False)
    with pytest.raises(ValueError, match="has width 8; this SAE has d_in=4"):
        SAE(SAEConfig(d_in=4, d_sae=8, k=2)).fit(store, progress=False)


def test_fit_on_the_fly_from_a_model(tiny_lens):
    """Straight from `stream_activations` (no store on disk): (acts, meta) batches, the tensor of `name`."""
    pytest.importorskip("mmlens.store")
    from mmlens.store import stream_activations
    from mmlens.testing.tiny_models import sample_image

    lens = tiny_lens("clip")
    name = "vision.blocks.1.resid_post"
    images = [sample_image(i) for i in range(8)]
    acts = next(stream_activations(lens, images[:2], names=name, batch_size=2))[0][name]
    d = acts.shape[-1]
    sae = SAE(SAEConfig(d_in=d, d_sae=4 * d, k=4, warmup_steps=1))
    sae.fit(stream_activations(lens, images, names=name, batch_size=2), name=name, steps=4, progress=False)
    assert sae.cfg.hook_name == name and sae.feature_stats["steps"] == 4
    assert sae.feature_stats["tokens"] == 4 * acts.shape[0]
    assert explained_variance(sae(acts), acts) > explained_variance(SAE(sae.cfg)(acts), acts)


# ------------------------------------------------------------------------------------------------- formats
def fitted(arch, d_in=12, d_sae=20, seed=0):
    """An SAE with random non-trivial weights, scale and thresholds (as if fitted)."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=3, hook_name="lm.blocks.1.resid_post"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        sae.W_dec.copy_(F.normalize(sae.W_dec, dim=1) * (0.5 + torch.rand(d_sae, 1, generator=g)))
        sae.input_scale.fill_(2.5)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.rand(d_sae, generator=g).add(0.05).log())
        if arch == "batchtopk":
            sae.batch_threshold.fill_(0.4)
    return sae


def test_save_load_round_trip(tmp_path):
    _, batch = dictionary_data(d=8, atoms=16)
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="jumprelu", batch_size=64)).fit(
        lambda s: batch(s, 64), steps=5, progress=False)
    sae.save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "weights.safetensors"]
    back = SAE.load(tmp_path / "sae")
    assert back.cfg == sae.cfg
    x = batch(1000, 32)
    assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x), sae(x))
    assert back.feature_stats["tokens"] == 5 * 64
    assert torch.equal(back.feature_stats["fire_count"], sae.feature_stats["fire_count"])
    assert torch.equal(sae.transform(x), sae.encode(x))
    doc = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cfg.json").write_text(json.dumps({**doc, "estimator": "LinearProbe"}))
    with pytest.raises(ValueError, match="holds a 'LinearProbe', not a SAE"):
        SAE.load(tmp_path / "other")


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk"])
def test_saelens_format_round_trip(tmp_path, arch):
    sae = fitted(arch)
    sae.save_saelens(tmp_path / "sl")
    doc = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert doc["architecture"] == {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu",
                                   "batchtopk": "jumprelu"}[arch]
    assert (doc["d_in"], doc["d_sae"], doc["apply_b_dec_to_input"], doc["normalize_activations"]) == (12, 20, True,
                                                                                                       "none")
    assert doc["metadata"]["hook_name"] == "lm.blocks.1.resid_post"
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "sl" / "sae_weights.safetensors")))
    thresholded = arch in ("jumprelu", "batchtopk")
    assert keys == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if thresholded else set())
    back = SAE.from_saelens(tmp_path / "sl")
    assert back.cfg.architecture == arch and (back.cfg.k == 3 or arch in ("relu", "jumprelu"))
    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-5)


def test_saelens_reader_folds_and_refuses(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(6)
    W_enc, W_dec = torch.randn(6, 10, generator=g), torch.randn(10, 6, generator=g)
    b_enc, b_dec = torch.randn(10, generator=g), torch.randn(6, generator=g)
    folder = tmp_path / "sl"
    folder.mkdir()
    save_file({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}, str(folder / "sae_weights.safetensors"))
    cfg = {"d_in": 6, "d_sae": 10, "dtype": "float32", "architecture": "topk", "k": 2, "apply_b_dec_to_input": False,
           "rescale_acts_by_decoder_norm": True, "normalize_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.3.hook_resid_pre"}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = SAE.from_saelens(folder, hook_name="lm.blocks.3.resid_pre")
    assert sae.cfg.hook_name == "lm.blocks.3.resid_pre"
    x = torch.randn(7, 6, generator=g)
    # SAELens's TopKSAE by hand: no b_dec on the input, pre scaled by decoder norms, decode divides them back
    n = W_dec.norm(dim=1)
    pre = (x @ W_enc + b_enc) * n
    v, i = pre.topk(2)
    f = torch.zeros_like(pre).scatter(1, i, v.relu())
    torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), (f / n) @ W_dec + b_dec, rtol=1e-5, atol=1e-5)
    b_dec_before = sae.b_dec.detach().clone()
    sae.fit([torch.randn(8, 6, generator=g) + 5], progress=False)  # fine-tuning: no re-initialisation from data
    assert float(sae.input_scale) == 1.0 and (sae.b_dec - b_dec_before).abs().max() < 0.01
    (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(ValueError, match="per-token normalisation"):
        SAE.from_saelens(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ValueError, match="'gated' has no mmlens counterpart"):
        SAE.from_saelens(folder)
    with pytest.raises(FileNotFoundError, match="not a SAELens SAE folder"):
        SAE.from_saelens(tmp_path)


def saelens_python() -> str | None:
    """A Python with sae-lens: $MMLENS_SAELENS_PYTHON, this one, or ../saelens-venv beside the repo."""
    import importlib.util

    if os.environ.get("MMLENS_SAELENS_PYTHON"):
        return os.environ["MMLENS_SAELENS_PYTHON"]
    if importlib.util.find_spec("sae_lens") is not None:
        return sys.executable
    venv = Path(__file__).resolve().parents[3] / "saelens-venv" / "bin" / "python"
    return str(venv) if venv.exists() else None


SAELENS_SIDE = r'''
import sys, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
root = Path(sys.argv[1])
torch.manual_seed(0)
x = torch.randn(10, 12)
made = {"standard": StandardSAE(StandardSAEConfig(d_in=12, d_sae=20)),
        "topk": TopKSAE(TopKSAEConfig(d_in=12, d_sae=20, k=3, rescale_acts_by_decoder_norm=True)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=12, d_sae=20)),
        "batchtopk": BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=12, d_sae=20, k=3))}
for name, sae in made.items():
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn_like(p))
        if name == "jumprelu":
            sae.threshold.abs_()
        if name == "batchtopk":
            sae.topk_threshold.fill_(0.2)
    if name == "batchtopk":
        sae.save_inference_model(root / f"sl_{name}")
        sae = SAE.load_from_disk(root / f"sl_{name}")
    else:
        sae.save_model(root / f"sl_{name}")
    f = sae.encode(x)
    save_file({"x": x, "f": f, "xhat": sae.decode(f)}, str(root / f"sl_{name}" / "io.safetensors"))
for folder in sorted(root.glob("ours_*")):
    sae = SAE.load_from_disk(folder)
    xx = load_file(str(folder / "x.safetensors"))["x"]
    f = sae.encode(xx)
    save_file({"f": f, "xhat": sae.decode(f)}, str(folder / "sl_io.safetensors"))
print(type(made["batchtopk"]).__name__, "ok")
'''


def test_real_saelens_reads_ours_and_we_read_its_files(tmp_path):
    py = saelens_python()
    if py is None:
        pytest.skip("sae-lens not installed (set MMLENS_SAELENS_PYTHON to a python that has it)")
    from safetensors.torch import load_file, save_file

    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(7))
    ours = {arch: fitted(arch, seed=i) for i, arch in enumerate(["relu", "topk", "jumprelu", "batchtopk"])}
    for arch, sae in ours.items():
        sae.save_saelens(tmp_path / f"ours_{arch}")
        save_file({"x": x}, str(tmp_path / f"ours_{arch}" / "x.safetensors"))
    res = subprocess.run([py, "-c", SAELENS_SIDE, str(tmp_path)], check=False, capture_output=True, text=True,
                         timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    for arch, sae in ours.items():  # SAELens's load_from_disk on our files computes what we compute
        io = load_file(str(tmp_path / f"ours_{arch}" / "sl_io.safetensors"))
        torch.testing.assert_close(io["f"], sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(io["xhat"], sae(x), rtol=1e-5, atol=1e-5)
    for name, arch in [("standard", "relu"), ("topk", "topk"), ("jumprelu", "jumprelu"), ("batchtopk", "batchtopk")]:
        io = load_file(str(tmp_path / f"sl_{name}" / "io.safetensors"))  # files SAELens wrote, read here
        sae = SAE.from_saelens(tmp_path / f"sl_{name}")
        assert sae.cfg.architecture == arch
        torch.testing.assert_close(sae.encode(io["x"]), io["f"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(io["f"]), io["xhat"], rtol=1e-5, atol=1e-5)


def test_batchtopk_threshold_stays_float32_so_its_running_average_moves():
    """bfloat16 would round the threshold's small steps away (lr 0.01 x a gap of 0.1 is under its 0.0156 spacing at
    2): the buffer stays float32 through `.to(dtype)`, and the update lands."""
    from mmlens.methods._sae_fit import Trainer

    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="batchtopk", k=2, batch_size=4, dtype="bfloat16"))
    assert sae.W_dec.dtype == torch.bfloat16 and sae.batch_threshold.dtype == torch.float32
    sae.to(torch.float16).to(torch.bfloat16)
    assert sae.batch_threshold.dtype == torch.float32 and "batch_threshold" in dict(sae.named_buffers())
    trainer = Trainer(sae, total=10)
    sae.batch_threshold.fill_(2.0)
    trainer._count({"fired": torch.zeros(16, dtype=torch.int64), "min_kept": torch.tensor(1.9, dtype=torch.bfloat16)},
                   4)
    want = 2.0 + sae.cfg.batch_threshold_lr * (float(torch.tensor(1.9, dtype=torch.bfloat16)) - 2.0)
    assert float(sae.batch_threshold) == pytest.approx(want, abs=1e-6) and float(sae.batch_threshold) != 2.0
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert sae.encode(x).dtype == torch.bfloat16
