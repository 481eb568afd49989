"""SAE.fit under torchrun: 2 CPU processes (gloo), each with half of every batch, train the same TopK SAE as one
process with the whole batches (DistributedDataParallel averages the gradients; firing statistics are summed, so
the dead features and their aux loss agree too)."""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys

import pytest
import torch

from mmlens.methods.sae import SAE, SAEConfig

CFG = {"d_in": 16, "d_sae": 128, "architecture": "topk", "k": 4, "lr": 3e-3, "batch_size": 256, "warmup_steps": 2,
       "dead_tokens": 256, "aux_k": 8}
STEPS = 12


def make_batch(step: int, n: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    atoms = torch.nn.functional.normalize(torch.randn(24, 16, generator=torch.Generator().manual_seed(99)), dim=1)
    idx = torch.rand(n, 24, generator=g).topk(3).indices
    return ((torch.rand(n, 3, generator=g) + 0.5)[:, :, None] * atoms[idx]).sum(1)


SCRIPT = """
import sys, torch, torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
from mmlens.methods.sae import SAE, SAEConfig
{make_batch}
half = {batch_size} // world
sae = SAE(SAEConfig(**{cfg!r})).fit(lambda s: make_batch(s)[rank * half:(rank + 1) * half], steps={steps},
                                     progress=False)
sae.save(sys.argv[1] + f"/rank{{rank}}")
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra", [{}, {"matryoshka_widths": [32, 128]}, {"normalize": "whiten", "whiten_tokens": 512}],
                         ids=["plain", "matryoshka", "whiten"])  # whiten: the covariance is summed over the ranks
def test_two_ranks_equal_one_process(tmp_path, monkeypatch, extra):
    cfg = {**CFG, **extra}
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(make_batch=inspect.getsource(make_batch), batch_size=CFG["batch_size"], cfg=cfg,
                                    steps=STEPS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path)],
                         check=False, capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = SAE.load(tmp_path / "rank0"), SAE.load(tmp_path / "rank1")
    from mmlens.methods import _sae_fit

    aux_steps = []

    def spy(sae, x, dead=None):
        out = _sae_fit.losses.__wrapped__(sae, x, dead)
        aux_steps.append("aux" in out)
        return out
    spy.__wrapped__ = _sae_fit.losses
    monkeypatch.setattr(_sae_fit, "losses", spy)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = SAE(SAEConfig(**cfg)).fit(make_batch, steps=STEPS, progress=False)
    finally:
        torch.set_num_threads(n)
    for name, p in single.state_dict().items():
        assert torch.equal(r0.state_dict()[name], r1.state_dict()[name]), f"ranks disagree on {name}"
        torch.testing.assert_close(r0.state_dict()[name], p, rtol=1e-5, atol=1e-6, msg=f"DDP vs one process: {name}")
    assert r0.feature_stats["tokens"] == single.feature_stats["tokens"] == STEPS * CFG["batch_size"]
    assert torch.equal(r0.feature_stats["fire_count"], single.feature_stats["fire_count"])
    assert sum(aux_steps) >= 3  # the aux loss on dead features was live (in both runs, since they agree)
    assert not torch.equal(single.W_dec, SAE(SAEConfig(**cfg)).W_dec)
    assert r0.cfg.matryoshka_widths == extra.get("matryoshka_widths")
    if "normalize" in extra:
        torch.testing.assert_close(r0._fit_state.whitening.matrix, single._fit_state.whitening.matrix)
        assert float(r0._fit_state.whitening.tokens) == 2 * CFG["batch_size"]  # two batches over both ranks
