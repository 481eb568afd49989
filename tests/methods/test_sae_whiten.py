"""SAEs trained on whitened activations (`normalize="whiten"`): the statistics and the fold by hand, a whitened fit
finds atoms a plain one misses, resume after a kill, iterables' peeked batches, a second fit of a folded SAE, and
config validation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mmlens.methods._sae_fit import Trainer
from mmlens.methods._sae_whiten import Whitening, fold, unfold
from mmlens.methods.sae import SAE, SAEConfig
from tests.methods.test_sae import dictionary_data


pytestmark = pytest.mark.usefixtures("one_thread")


def anisotropic(n=5000, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(d, d, generator=g) * torch.tensor([10.0, 3, 1, 0.3, 0.1, 0.01])
    return torch.randn(n, d, generator=g) @ L.T + 5 * torch.randn(d, generator=g)


def test_whitening_statistics_and_fold_by_hand():
    x = anisotropic()
    d = x.shape[1]
    w = Whitening(d).estimate([x[:2000], x[2000:]], eps=1e-12)  # batches are pooled
    z = w(x.double())
    assert z.mean(0).abs().max() < 1e-10
    torch.testing.assert_close(torch.cov(z.T), torch.eye(d, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.matrix @ w.inverse, torch.eye(d, dtype=torch.float64))
    # a floor of eps x the mean eigenvalue: the smallest directions are no longer blown up; the RMS norm is sqrt(d)
    w = Whitening(d).estimate([x], eps=0.1)
    z = w(x.double())
    assert float(z.pow(2).sum() / (len(z) - 1)) == pytest.approx(d, rel=1e-9)  # E||z||^2 = d (unbiased, as the cov)
    lam = torch.linalg.eigvalsh(torch.cov(z.T))
    assert float(lam.min()) < 0.01 < 0.5 < float(lam.max())

    # fold: the whitened-coordinate SAE on z and the folded one on x give the same codes and reconstructions
    sae = SAE(SAEConfig(d_in=d, d_sae=16, k=3, normalize="whiten"))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
        sae.W_enc.mul_(torch.rand(16) + 0.5)
    ref = copy.deepcopy(sae)
    codes = ref.encode(z.float())
    recon = (ref.decode(codes).double() @ w.inverse + w.mean).float()
    fold(sae, w)
    torch.testing.assert_close(sae.encode(x), codes, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae(x), recon, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16))
    unfold(sae, w)
    for (name, a), b in zip(sae.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def split_subspace_atoms(small=0.05, d=32, atoms=64, k=3):
    """Half of the atoms in the first half of the dims, half (scaled by `small`) in the other: the second group holds
    1/400 of the variance, which a plain SAE's MSE all but ignores."""
    g = torch.Generator().manual_seed(0)
    A = torch.zeros(atoms, d)
    A[:atoms // 2, :d // 2] = F.normalize(torch.randn(atoms // 2, d // 2, generator=g), dim=1)
    A[atoms // 2:, d // 2:] = F.normalize(torch.randn(atoms // 2, d // 2, generator=g), dim=1)
    scale = torch.ones(atoms)
    scale[atoms // 2:] = small

    def batch(step, n=512, with_labels=False):
        g = torch.Generator().manual_seed(step)
        idx = torch.rand(n, atoms, generator=g).topk(k).indices
        coef = (torch.rand(n, k, generator=g) + 0.5) * scale[idx]
        x = (coef[:, :, None] * A[idx]).sum(1)
        return (x, torch.zeros(n, atoms, dtype=torch.bool).scatter_(1, idx, True)) if with_labels else x
    return batch


def best_auroc(codes: torch.Tensor, positive: torch.Tensor) -> float:
    """The largest AUROC over features of `codes` (n, F) for the rows in `positive`: P(pos > neg) + P(tie) / 2."""
    neg = codes[~positive].T.contiguous().sort(dim=1).values
    pos = codes[positive].T.contiguous()
    below = torch.searchsorted(neg, pos, right=False).double()
    at_most = torch.searchsorted(neg, pos, right=True).double()
    return float(((below + at_most) / 2).mean(1).max() / neg.shape[1])


def test_best_auroc_by_hand():
    codes = torch.tensor([[0.0, 1.0], [0.0, 0.0], [2.0, 0.0], [1.0, 3.0]])
    # column 0: pos {0, 2} vs neg {0, 1}: pairs (0>0 tie, 0>1 no, 2>0, 2>1) = 2.5/4; column 1: {1, 0} vs {0, 3}: 1.5/4
    assert best_auroc(codes, torch.tensor([True, False, True, False])) == pytest.approx(0.625)


def test_whitened_fit_finds_the_low_variance_atoms_a_plain_fit_misses():
    batch = split_subspace_atoms()
    x, on = batch(99_999, n=4096, with_labels=True)
    detect = {}
    for norm in ("expected_norm", "whiten"):
        cfg = SAEConfig(d_in=32, d_sae=128, k=3, lr=3e-3, batch_size=512, warmup_steps=20, dead_tokens=20_000,
                        aux_k=32, normalize=norm, whiten_tokens=4096)
        sae = SAE(cfg).fit(batch, steps=400, progress=False)
        with torch.no_grad():
            codes = sae.encode(x)
            ev = 1 - float((sae.decode(codes) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        best = torch.tensor([best_auroc(codes, on[:, a]) for a in range(64)])  # best feature per atom
        detect[norm] = (float(best[:32].mean()), float(best[32:].mean()))
        assert ev > 0.9, (norm, ev)  # the folded SAE reads raw activations
    assert detect["expected_norm"][0] > 0.9 and detect["whiten"][0] > 0.9
    assert detect["expected_norm"][1] < 0.7 < 0.85 < detect["whiten"][1], detect  # measured 0.59 and 0.93


def test_whitened_resume_after_a_kill_and_iterables(tmp_path):
    _, batch = dictionary_data(d=8, atoms=16, seed=2)
    cfg = SAEConfig(d_in=8, d_sae=32, k=2, lr=1e-2, batch_size=64, warmup_steps=3, dead_tokens=128, aux_k=4,
                    normalize="whiten", whiten_tokens=200)  # 4 batches read for the statistics

    def killed(step):
        if step == 9:
            raise RuntimeError("killed")
        return batch(step, 64)

    with pytest.raises(RuntimeError, match="killed"):
        half = SAE(cfg)
        half.fit(killed, steps=14, work=tmp_path / "run", every=4, progress=False)
    # the SAE left in memory by the failed run was folded back once: unfolded, its decoder rows are the unit rows
    # training keeps in whitened coordinates; as it is, they are not
    assert not torch.allclose(half.W_dec.norm(dim=1), torch.ones(32), atol=1e-2)
    unfold(half, half._fit_state.whitening)
    torch.testing.assert_close(half.W_dec.norm(dim=1), torch.ones(32))
    resumed = SAE(cfg).fit(lambda s: batch(s, 64), steps=14, work=tmp_path / "run", every=4, progress=False)
    straight = SAE(cfg).fit(lambda s: batch(s, 64), steps=14, progress=False)
    # an iterable is read once: the batches read for the statistics are kept and trained on, in order
    once = SAE(cfg).fit(iter([batch(s, 64) for s in range(14)]), steps=14, progress=False)
    for (n, a), b, c in zip(resumed.state_dict().items(), straight.state_dict().values(), once.state_dict().values()):
        assert torch.equal(a, b), n
        assert torch.equal(c, b), n
    assert straight.feature_stats["tokens"] == 14 * 64
    plain = SAE(SAEConfig(**{**cfg.__dict__, "normalize": "expected_norm"})).fit(lambda s: batch(s, 64), steps=14,
                                                                                 progress=False)
    assert not torch.allclose(plain.W_enc, straight.W_enc)


def test_a_later_fit_goes_on_in_the_same_whitened_coordinates(tmp_path):
    """The statistics ride along with the SAE (saved and loaded): a later fit unfolds the weights with them, back to
    exactly what the first fit had trained (its last checkpoint holds those whitened weights), reading no data."""
    from safetensors.torch import load_file

    _, batch = dictionary_data(d=16, atoms=32, seed=4)
    cfg = SAEConfig(d_in=16, d_sae=64, k=3, lr=3e-3, batch_size=256, warmup_steps=5, normalize="whiten",
                    whiten_tokens=1024)
    SAE(cfg).fit(batch, steps=20, work=tmp_path / "run", every=10, progress=False).save(tmp_path / "sae")
    trained = {k[len("sae."):]: v for k, v in load_file(str(tmp_path / "run" / "model.safetensors")).items()
               if k.startswith("sae.")}
    sae = SAE.load(tmp_path / "sae")
    assert sae.feature_stats["tokens"] == 20 * 512 and sae._fit_state.whitening.estimated
    x = batch(321)
    sae.save_saelens(tmp_path / "sl")  # a plain SAE on raw activations: SAELens's format holds it as it is
    back = SAE.from_saelens(tmp_path / "sl")
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    torch.testing.assert_close(back(x), sae(x))
    trainer = Trainer(sae, total=1)
    trainer.enter_whitened([], fresh=False)
    for name, p in sae.state_dict().items():
        torch.testing.assert_close(p, trained[name], atol=1e-5, rtol=1e-5, msg=name)


def test_a_sae_fitted_otherwise_moves_into_whitened_coordinates_unchanged():
    """A trained SAE without statistics (here a ReLU one fitted with expected_norm, its input_scale not 1) gets
    them estimated and its weights rewritten in them with unit decoder rows: the same function (exactly so for
    ReLU and JumpReLU), and again after folding back."""
    _, batch = dictionary_data(d=16, atoms=32, seed=4)
    sae = SAE(SAEConfig(d_in=16, d_sae=64, architecture="relu", l1_coefficient=0.3, lr=3e-3, batch_size=256,
                        warmup_steps=5)).fit(batch, steps=30, progress=False)
    assert float(sae.input_scale) != pytest.approx(1.0)
    x = batch(555)
    codes, recon = sae.encode(x).detach(), sae(x).detach()
    sae.cfg.normalize = "whiten"
    trainer = Trainer(sae, total=1)
    trainer.enter_whitened([batch(s) for s in range(4)], fresh=False)
    assert float(sae.input_scale) == 1.0 and trainer.whitening.tokens == 4 * 512
    w = trainer.whitening
    z = w(x.double()).float()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))  # unit rows again, for the trainer
    with torch.no_grad():
        assert torch.equal(sae.encode(z) > 0, codes > 0)
        torch.testing.assert_close((sae(z).double() @ w.inverse + w.mean).float(), recon, atol=1e-4, rtol=1e-4)
    trainer.fold_whitening()
    trainer.fold_whitening()  # a no-op: the SAE is in raw coordinates now
    torch.testing.assert_close(sae(x), recon, atol=1e-4, rtol=1e-4)


def test_whitening_config_errors():
    with pytest.raises(ValueError, match=r"normalize='zca'; allowed: \('none', 'expected_norm', 'whiten'\)"):
        SAEConfig(d_in=4, d_sae=8, k=2, normalize="zca")
    with pytest.raises(ValueError, match="whiten_eps > 0 and whiten_tokens >= 1"):
        SAEConfig(d_in=4, d_sae=8, k=2, normalize="whiten", whiten_eps=0.0)
    with pytest.raises(ValueError, match="whiten_eps > 0 and whiten_tokens >= 1"):
        SAEConfig(d_in=4, d_sae=8, k=2, normalize="whiten", whiten_tokens=0)
