"""Matryoshka SAEs (Bussmann, Nabeshima, Karvonen & Nanda 2025): the nested loss against a dense autograd reference
for every architecture, the single-width case against the plain SAE, recovery of planted parent features in the
first prefix, config validation, and the widths through save/load, SAELens's format and resume after a kill."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmlens.methods import _sae_kernels as K
from mmlens.methods._sae_fit import losses
from mmlens.methods.sae import SAE, SAEConfig
from tests.methods.test_sae import aux_reference


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_matryoshka_loss(sae, x, dead=None):
    """The objective written densely with autograd everywhere: sum over widths m of the MSE of
    f[:, :m] @ W_dec[:m] + b_dec, plus the sparsity penalty (ReLU, JumpReLU) and AuxK on the whole SAE's residual
    (matryoshka_aux: per level, the band's dead features on the error of the prefix ending with the band)."""
    cfg = sae.cfg
    target = x * sae.input_scale
    pre = (target - sae.b_dec) @ sae.W_enc + sae.b_enc
    penalty = 0.0
    if cfg.architecture == "topk":
        vals, idx = pre.topk(cfg.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))
    elif cfg.architecture == "batchtopk":
        flat = F.relu(pre).reshape(-1)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(cfg.k * x.shape[0]).indices] = True
        f = F.relu(pre) * keep.view_as(pre)
    elif cfg.architecture == "relu":
        f = F.relu(pre)
        penalty = cfg.l1_coefficient * (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    else:
        t = sae.threshold
        f = K.JumpReLU.apply(pre, t, cfg.jumprelu_bandwidth)
        penalty = cfg.l0_coefficient * K.Step.apply(pre, t, cfg.jumprelu_bandwidth).sum(-1).mean()
    loss, lo = penalty, 0
    for m in cfg.matryoshka_widths:
        recon = f[:, :m] @ sae.W_dec[:m] + sae.b_dec
        loss = loss + (recon - target).pow(2).sum(-1).mean()
        if cfg.matryoshka_aux and dead is not None:
            band = torch.zeros_like(dead)
            band[lo:m] = True
            loss = loss + aux_reference(sae, pre, target, recon, dead & band)
        lo = m
    if cfg.matryoshka_aux:
        return loss
    return loss + aux_reference(sae, pre, target, recon, dead)  # `recon` is now the whole SAE's


def randomised(cfg, seed=4):
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(cfg.d_in, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(cfg.d_sae, generator=g))
        sae.input_scale.fill_(1.7)
        if cfg.architecture == "jumprelu":
            sae.log_threshold.copy_((0.3 * torch.rand(cfg.d_sae, generator=g) + 0.05).log())
    return sae, g


def test_prefix_decode_matches_dense_prefixes():
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 4])
    offsets = torch.cumsum(counts, 0) - counts
    cols = torch.cat([torch.randperm(12, generator=g)[:int(c)] for c in counts])
    vals = torch.randn(len(cols), generator=g, dtype=torch.float64)
    W = torch.randn(12, 6, generator=g, dtype=torch.float64)
    code = torch.zeros(5, 12, dtype=torch.float64).index_put((K.bag_rows(offsets, len(cols)), cols), vals)
    widths = [2, 3, 7, 12]
    got = K.prefix_decode(vals, offsets, cols, W, widths)
    want = torch.stack([code[:, :m] @ W[:m] for m in widths], 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(K.prefix_decode_dense(code, W, widths), want, rtol=1e-12, atol=1e-12)
    assert got[1].abs().max() == 0  # the token with no entries


@pytest.mark.parametrize("per_level", [False, True], ids=["aux", "matryoshka_aux"])
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_nested_loss_and_gradients_equal_the_dense_reference(arch, per_level):
    cfg = SAEConfig(d_in=16, d_sae=96, architecture=arch, k=5, aux_k=12, dtype="float64", l1_coefficient=0.2,
                    l0_coefficient=0.3, jumprelu_bandwidth=0.05, matryoshka_widths=[4, 20, 50, 96],
                    matryoshka_aux=per_level)
    sae, g = randomised(cfg)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64)
    dead = torch.rand(96, generator=g) < 0.3
    dead[:4] = False  # a level with no dead feature adds nothing
    dead[20:23] = True  # fewer dead than aux_k in every band: each band's own scale
    for d in (None, dead):
        sae.zero_grad(set_to_none=True)
        out = losses(sae, x, d)
        out["loss"].backward()
        got = {n: p.grad.clone() for n, p in sae.named_parameters()}
        sae.zero_grad(set_to_none=True)
        ref = dense_matryoshka_loss(sae, x, d)
        ref.backward()
        assert abs(float(out["loss"]) - float(ref)) < 1e-6, (arch, float(out["loss"]), float(ref))
        assert out["matryoshka_mse"].shape == (4,) and float(out["matryoshka_mse"][-1]) == float(out["mse"])
        for n, p in sae.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-9,
                                       msg=f"{arch} grad {n} (dead={d is not None})")


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_one_width_is_the_plain_sae(arch):
    kw = dict(d_in=12, d_sae=40, architecture=arch, k=4, aux_k=8)
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(1))
    dead = torch.arange(40) % 3 == 0
    plain, _ = randomised(SAEConfig(**kw))
    one, _ = randomised(SAEConfig(**kw, matryoshka_widths=[40]))
    a, b = losses(plain, x, dead), losses(one, x, dead)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["recon"], b["recon"])
    a["loss"].backward()
    b["loss"].backward()
    for (n, p), q in zip(plain.named_parameters(), one.parameters()):
        assert torch.equal(p.grad, q.grad), n


# ---------------------------------------------------------------------------------------------- behaviour
def hierarchy(d=32, parents=4, children=4, p_parent=0.3, p_child=0.75, seed=0):
    """Planted hierarchy: each parent direction fires with p_parent; a firing parent has one of its own children
    with p_child (a child never fires without its parent), x = sum of a * parent + b * child. All 20 directions
    orthonormal; returns (parents, children, step -> batch)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, parents * (children + 1), generator=g)).Q.T
    P, C = Q[:parents], Q[parents:].reshape(parents, children, d)

    def batch(step: int, n: int = 256) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + step)
        par = (torch.rand(n, parents, generator=g) < p_parent).float()
        which = torch.randint(children, (n, parents), generator=g)
        child = par * (torch.rand(n, parents, generator=g) < p_child).float()
        a = (torch.rand(n, parents, generator=g) + 0.5) * par
        b = (torch.rand(n, parents, generator=g) + 0.5) * child
        return a @ P + (b[:, :, None] * C[torch.arange(parents)[None, :], which]).sum(1)
    return P, C, batch


def test_matryoshka_puts_the_parents_in_its_first_prefix():
    """Measured (6 seeds, 300 steps): the Matryoshka BatchTopK SAE's first 6 features hold every parent at cosine
    0.92-0.97 (a parent feature carries its children's mean, hence not 1). A plain BatchTopK SAE learns the parents
    too here (cosine ~1.0, parents also fire alone) but anywhere in its dictionary: its first 6 features miss most."""
    P, _, batch = hierarchy()
    kw = dict(d_in=32, d_sae=32, architecture="batchtopk", k=2, lr=1e-2, batch_size=256, warmup_steps=10,
              dead_tokens=5000, aux_k=8)
    nested = SAE(SAEConfig(**kw, matryoshka_widths=[6, 32])).fit(batch, steps=300, progress=False)
    first = (P @ nested.W_dec[:6].detach().T).max(1).values
    assert (first > 0.9).all(), f"max cosine of each parent with the first prefix: {first.tolist()}"
    plain = SAE(SAEConfig(**kw)).fit(batch, steps=300, progress=False)
    anywhere = (P @ plain.W_dec.detach().T).max(1).values
    plain_first = (P @ plain.W_dec[:6].detach().T).max(1).values
    assert (anywhere > 0.9).all() and (plain_first < 0.9).any(), (anywhere.tolist(), plain_first.tolist())
    x = batch(99_999)
    out = losses(nested, x)
    assert float(out["matryoshka_mse"][0]) > float(out["matryoshka_mse"][1])  # the prefix reconstructs, coarsely


# --------------------------------------------------------------------------------------- config and files
@pytest.mark.parametrize("widths, match", [
    ([], "non-empty list"), ([4, 4, 32], "strictly increasing"), ([8, 4, 32], "strictly increasing"),
    ([0, 32], ">= 1"), ([4, 16], "end at d_sae=32"), ([4, 40], "end at d_sae=32"), ([4.0, 32], "list of ints"),
    ([True, 32], "list of ints"), ("4,32", "list of ints"), (32, "list of ints")])
def test_config_validation(widths, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(d_in=8, d_sae=32, matryoshka_widths=widths)


def test_per_level_aux_needs_widths():
    with pytest.raises(ValueError, match="matryoshka_aux=True is the per-level aux loss of a Matryoshka SAE"):
        SAEConfig(d_in=8, d_sae=32, matryoshka_aux=True)


def test_config_accepts_tuples_and_every_architecture():
    for arch in ("relu", "topk", "batchtopk", "jumprelu"):
        cfg = SAEConfig(d_in=8, d_sae=32, architecture=arch, k=2, matryoshka_widths=(4, 16, 32))
        assert cfg.matryoshka_widths == [4, 16, 32]
    assert "matryoshka_widths=[4, 16, 32]" in repr(SAE(cfg))


def test_save_load_and_saelens_keep_the_widths(tmp_path):
    P, _, batch = hierarchy(d=12, parents=2, children=2)
    cfg = SAEConfig(d_in=12, d_sae=20, architecture="batchtopk", k=2, batch_size=64,
                    matryoshka_widths=[3, 8, 20], hook_name="lm.blocks.1.resid_post")
    sae = SAE(cfg).fit(lambda s: batch(s, 64), steps=6, progress=False)
    sae.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "cfg.json").read_text())["config"]["matryoshka_widths"] == [3, 8, 20]
    back = SAE.load(tmp_path / "ours")
    x = batch(500, 16)
    assert back.cfg == sae.cfg and torch.equal(back(x), sae(x))
    sae.save_saelens(tmp_path / "sl")  # what SAELens's trainer writes for MatryoshkaBatchTopK: a JumpReLU
    doc = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert doc["architecture"] == "jumprelu" and "matryoshka_widths" not in doc
    assert doc["metadata"]["training_architecture"] == "matryoshka_batchtopk"
    assert doc["metadata"]["training_architecture_details"] == {"k": 2, "matryoshka_widths": [3, 8, 20],
                                                                "use_matryoshka_aux_loss": False}
    sl = SAE.from_saelens(tmp_path / "sl")
    assert (sl.cfg.architecture, sl.cfg.k, sl.cfg.matryoshka_widths) == ("batchtopk", 2, [3, 8, 20])
    per_level = SAE(SAEConfig(**{**cfg.__dict__, "matryoshka_aux": True}))
    per_level.load_state_dict(sae.state_dict())
    per_level.save_saelens(tmp_path / "sl_aux")
    assert SAE.from_saelens(tmp_path / "sl_aux").cfg.matryoshka_aux is True and sl.cfg.matryoshka_aux is False
    torch.testing.assert_close(sl(x), sae(x), rtol=1e-5, atol=1e-5)
    # SAELens appends d_sae when the widths stop short of it; a broken detail is dropped with a warning
    for widths, want in (([3, 8], [3, 8, 20]), ([8, 3], None)):
        doc["metadata"]["training_architecture_details"]["matryoshka_widths"] = widths
        (tmp_path / "sl" / "cfg.json").write_text(json.dumps(doc))
        if want is None:
            with pytest.warns(UserWarning, match="ignoring its training detail matryoshka_widths"):
                assert SAE.from_saelens(tmp_path / "sl").cfg.matryoshka_widths is None
        else:
            assert SAE.from_saelens(tmp_path / "sl").cfg.matryoshka_widths == want
    topk = SAE(SAEConfig(d_in=12, d_sae=20, architecture="topk", k=3, matryoshka_widths=[5, 20]))
    topk.save_saelens(tmp_path / "sl_topk")
    doc = json.loads((tmp_path / "sl_topk" / "cfg.json").read_text())
    assert doc["architecture"] == "topk" and doc["metadata"]["training_architecture"] == "matryoshka_topk"
    assert SAE.from_saelens(tmp_path / "sl_topk").cfg.matryoshka_widths == [5, 20]


SAELENS_SIDE = r'''
import sys, warnings
warnings.filterwarnings("ignore")
import torch
from safetensors.torch import save_file
from sae_lens import SAE
from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                    MatryoshkaBatchTopKTrainingSAEConfig)
torch.manual_seed(0)
sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(d_in=12, d_sae=20, k=3,
                                                                          matryoshka_widths=[4, 10, 20],
                                                                          use_matryoshka_aux_loss=True))
with torch.no_grad():
    for p in sae.parameters():
        p.copy_(0.3 * torch.randn_like(p))
    sae.topk_threshold.fill_(0.2)
sae.save_inference_model(sys.argv[1])
sae = SAE.load_from_disk(sys.argv[1])
x = torch.randn(10, 12)
f = sae.encode(x)
save_file({"x": x, "f": f, "xhat": sae.decode(f)}, sys.argv[1] + "/io.safetensors")
'''


def test_we_read_a_real_saelens_matryoshka_sae(tmp_path):
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    venv = Path(__file__).resolve().parents[3] / "saelens-venv" / "bin" / "python"  # as test_sae.saelens_python
    py = os.environ.get("MMLENS_SAELENS_PYTHON") or (sys.executable if importlib.util.find_spec("sae_lens") else
                                                    str(venv) if venv.exists() else None)
    if py is None:
        pytest.skip("sae-lens not installed (set MMLENS_SAELENS_PYTHON to a python that has it)")
    from safetensors.torch import load_file

    res = subprocess.run([py, "-c", SAELENS_SIDE, str(tmp_path / "sl")], check=False, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    sae = SAE.from_saelens(tmp_path / "sl")
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.matryoshka_widths) == ("batchtopk", 3, [4, 10, 20])
    assert sae.cfg.matryoshka_aux is True  # its use_matryoshka_aux_loss, a training detail
    io = load_file(str(tmp_path / "sl" / "io.safetensors"))
    torch.testing.assert_close(sae.encode(io["x"]), io["f"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(io["f"]), io["xhat"], rtol=1e-5, atol=1e-5)


SAELENS_AUX = r'''
import sys, warnings
warnings.filterwarnings("ignore")
import torch
from safetensors.torch import save_file
from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                    MatryoshkaBatchTopKTrainingSAEConfig)
torch.manual_seed(0)
sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
    d_in=12, d_sae=20, k=3, matryoshka_widths=[4, 10, 20], use_matryoshka_aux_loss=True, dtype="float64"))
with torch.no_grad():
    for p in sae.parameters():
        p.copy_(0.3 * torch.randn_like(p))
    sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))  # unit rows, as ours train: rescale_acts_by_decoder_norm
x = torch.randn(32, 12, dtype=torch.float64)             # (SAELens's option for other norms) is then a no-op
dead = torch.zeros(20, dtype=torch.bool)
dead[[1, 5, 6, 7, 8, 12, 13, 14, 15, 16, 17, 18, 19]] = True
acts, pre = sae.encode_with_hidden_pre(x)
out = sae.decode(acts)
aux = sae.calculate_matryoshka_aux_loss(sae_in=x, sae_out=out, feature_acts=acts, hidden_pre=pre,
                                        dead_neuron_mask=dead)
save_file({"x": x, "dead": dead, "aux": aux.reshape(1), "coef": torch.tensor([sae.cfg.aux_loss_coefficient]),
           "acts": acts.contiguous(), "pre": pre.contiguous(), "out": out.contiguous(),
           **{n: p.detach().contiguous() for n, p in sae.named_parameters()}}, sys.argv[1])
'''


def test_per_level_aux_equals_saelens(tmp_path):
    """The per-level aux term (loss with dead features minus loss without) equals SAELens's
    calculate_matryoshka_aux_loss on the same weights, batch and dead mask (aux_k = d_in // 2, as SAELens sets it)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    venv = Path(__file__).resolve().parents[3] / "saelens-venv" / "bin" / "python"
    py = os.environ.get("MMLENS_SAELENS_PYTHON") or (sys.executable if importlib.util.find_spec("sae_lens") else
                                                    str(venv) if venv.exists() else None)
    if py is None:
        pytest.skip("sae-lens not installed (set MMLENS_SAELENS_PYTHON to a python that has it)")
    from safetensors.torch import load_file

    res = subprocess.run([py, "-c", SAELENS_AUX, str(tmp_path / "aux.safetensors")], check=False, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    t = load_file(str(tmp_path / "aux.safetensors"))
    cfg = SAEConfig(d_in=12, d_sae=20, architecture="batchtopk", k=3, matryoshka_widths=[4, 10, 20],
                    matryoshka_aux=True, aux_k=6, aux_coefficient=float(t["coef"]), normalize="none", dtype="float64")
    sae = SAE(cfg)
    with torch.no_grad():
        for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, n).copy_(t[n])
    with torch.no_grad():
        ours = losses(sae, t["x"], t["dead"])["loss"] - losses(sae, t["x"], None)["loss"]
    assert float(t["aux"]) > 0
    torch.testing.assert_close(ours, t["aux"][0], rtol=1e-9, atol=1e-12)
