"""Reading a store: shuffled batches hold every selected token exactly once per epoch, deterministic from the seed,
read in bounded pieces; `where` filters, `stratify` hits its shares exactly, ranks get disjoint slices whose union is
everything; the raw reader agrees with safetensors. Synthetic stores: `act[:, 0]` is each token's global index."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mmlens.store import MODALITIES, ActivationStore
from mmlens.store.synthetic import write_synthetic

N, D, NAME = 5000, 8, "synthetic.resid"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn") / "s", N, D, dtype="float32", shard_tokens=700,
                           batch_tokens=350)


def ids(batches) -> torch.Tensor:
    return torch.cat([b[:, 0] for b in batches]).long()


def test_every_token_once_per_epoch_and_deterministic(store):
    assert len(store) == N and len(store.shards) == 8 and store.d == {NAME: D}
    first = list(store.batches(NAME, 64, seed=3, buffer_tokens=1000))
    seen = ids(first)
    assert torch.equal(seen.sort().values, torch.arange(N))  # each exactly once
    assert [len(b) for b in first] == [64] * (N // 64) + [N % 64]
    assert torch.equal(seen, ids(store.batches(NAME, 64, seed=3, buffer_tokens=1000)))  # same seed, same batches
    assert not torch.equal(seen, ids(store.batches(NAME, 64, seed=4, buffer_tokens=1000)))
    # shuffled beyond one shard: the first batch draws from several shards, and not in order
    assert len(set((seen[:64] // 700).tolist())) > 1 and not torch.equal(seen[:64], seen[:64].sort().values)
    two = ids(store.batches(NAME, 64, seed=3, buffer_tokens=1000, epochs=2))
    assert torch.equal(two[:N], seen) and torch.equal(two[N:].sort().values, torch.arange(N))
    assert not torch.equal(two[N:], seen)  # the second epoch is another order
    ordered = ids(store.batches(NAME, 100, shuffle=False))
    assert torch.equal(ordered, torch.arange(N))
    assert list(store.batches(NAME, 64, seed=3, buffer_tokens=1000))[0].dtype == torch.float32


def test_reads_in_bounded_pieces(store, monkeypatch):
    sizes = []
    read = ActivationStore._read

    def spy(self, j, key, lo, hi):
        sizes.append(hi - lo)
        return read(self, j, key, lo, hi)

    monkeypatch.setattr(ActivationStore, "_read", spy)
    assert len(ids(store.batches(NAME, 50, seed=0, buffer_tokens=400))) == N
    assert max(sizes) <= 200 and sum(sizes) == N  # never the whole store: pieces of at most buffer_tokens / 2


def test_where_filters_by_metadata(store):
    image = store.meta["modality"] == MODALITIES.index("image")
    assert torch.equal(store.select(modality="image"), image)
    assert torch.equal(store.select(modality=["image", "text"]), torch.ones(N, dtype=torch.bool))
    sel = store.select(modality="image", row=[0, 3])
    pos = torch.arange(N) % 64  # image tokens: positions 0..15 on a 4x4 grid
    assert torch.equal(sel, (pos < 16) & torch.isin(pos // 4, torch.tensor([0, 3])))
    got = ids(store.batches(NAME, 32, seed=1, where={"modality": "image", "row": [0, 3]}, buffer_tokens=300))
    assert torch.equal(got.sort().values, sel.nonzero().flatten())
    got = ids(store.batches(NAME, 32, seed=1, where=sel))
    assert torch.equal(got.sort().values, sel.nonzero().flatten())
    at5 = torch.arange(N)[store.meta["position"] == 5]
    torch.testing.assert_close(store.tensor(NAME, where={"position": 5})[:, 0], at5.float())
    with pytest.raises(ValueError, match="no metadata column 'colour'"):
        store.select(colour=1)
    with pytest.raises(ValueError, match="allowed"):
        store.select(modality="video")
    with pytest.raises(ValueError, match="selects no token"):
        next(store.batches(NAME, 8, where={"step": 3}))


def test_stratify_gives_the_shares(store):
    image = store.select(modality="image")  # 16 of every 64 tokens
    n_img = int(image.sum())
    got = ids(store.batches(NAME, 50, seed=2, stratify={"modality": {"image": 0.5, "text": 0.5}}))
    assert int(image[got].sum()) == n_img and int((~image[got]).sum()) == n_img  # all images, as many texts
    assert len(set(got.tolist())) == len(got)
    share = ids(store.batches(NAME, 50, seed=2, stratify={"modality": {"image": 1, "text": 3}}))  # normalised
    # 1256 image and 3744 text tokens: text is the scarce one at 3/4, so 3744 / 0.75 = 4992 tokens, 1248 images
    assert n_img == 1256 and int(image[share].sum()) == 1248 and int((~image[share]).sum()) == 3744
    epochs = ids(store.batches(NAME, 50, seed=2, stratify={"modality": {"image": 0.5, "text": 0.5}}, epochs=2))
    a, b = epochs[:2 * n_img], epochs[2 * n_img:]
    assert set(a[image[a]].tolist()) == set(b[image[b]].tolist())  # the scarce stratum whole in every epoch
    assert set(a[~image[a]].tolist()) != set(b[~image[b]].tolist())  # the other one subsampled afresh
    with pytest.raises(ValueError, match="no selected token has modality='latent'"):
        next(store.batches(NAME, 8, stratify={"modality": {"image": 0.5, "latent": 0.5}}))
    with pytest.raises(ValueError, match="one metadata column"):
        next(store.batches(NAME, 8, stratify={"modality": {"image": 1}, "row": {0: 1}}))


def test_ranks_get_disjoint_slices_covering_everything(store):
    for kw in ({}, {"where": {"modality": "text"}}, {"stratify": {"modality": {"image": 0.5, "text": 0.5}}}):
        parts = [ids(store.batches(NAME, 40, seed=5, rank=r, world_size=3, buffer_tokens=500, **kw)) for r in range(3)]
        whole = ids(store.batches(NAME, 40, seed=5, buffer_tokens=500, **kw))
        union = torch.cat(parts)
        assert len(set(union.tolist())) == len(union)  # disjoint
        assert torch.equal(union.sort().values, whole.sort().values)  # together: everything once
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        next(store.batches(NAME, 8, rank=3, world_size=3))


def test_with_meta_rows_match(store):
    x, meta = next(store.batches(NAME, 64, seed=0, with_meta=True, dtype=torch.float64))
    g = x[:, 0].long()
    assert x.dtype == torch.float64
    for col in ("example", "position", "modality", "row", "col"):
        assert torch.equal(meta[col], store.meta[col][g]), col


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_stores_round_trip_through_the_raw_reader(tmp_path, dtype):
    s = write_synthetic(tmp_path / dtype, 300, 12, dtype=dtype, shard_tokens=128, batch_tokens=64)
    assert s.dtype == getattr(torch, dtype) and len(s.shards) == 3
    ref = torch.cat([load_file(str(p))[f"act/{NAME}"] for p, _ in s.shards])
    assert torch.equal(s.tensor(NAME, dtype=s.dtype), ref)
    got = torch.cat(list(s.batches(NAME, 7, seed=0, buffer_tokens=50, dtype=s.dtype)))
    assert torch.equal(got[got[:, 0].float().argsort(stable=True)].float().sum(0), ref.float().sum(0))


def test_bad_reads_are_refused(store):
    with pytest.raises(KeyError, match="did you mean 'synthetic.resid'"):
        store.tensor("synthetic.resdi")
    with pytest.raises(ValueError, match="buffer_tokens"):
        next(store.batches(NAME, 64, buffer_tokens=10))
    with pytest.raises(ValueError, match="batch_size"):
        next(store.batches(NAME, 0))
    with pytest.raises(KeyError, match="columns"):
        store.meta["colour"]
