"""A store survives a kill (resume gives exactly the uninterrupted store, finished shards untouched), refuses to
resume into a store written for something else, and splits the work across ranks: each rank its own items and
shards, the reader seeing all of them (also with two real processes under gloo)."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from mmlens.store import ActivationStore, write_activations
from mmlens.testing.tiny_models import sample_image

NAME = "vision.blocks.1.resid_post"


class Dying(list):
    """A dataset whose iteration dies (like a killed job) after `alive` items."""

    def __init__(self, items, alive: int):
        super().__init__(items)
        self.alive = alive

    def __iter__(self):
        for i, x in enumerate(list.__iter__(self)):
            if i == self.alive:
                raise KeyboardInterrupt("killed")
            yield x


def _same(a: ActivationStore, b: ActivationStore) -> None:
    assert len(a) == len(b) and [n for _, n in a.shards] == [n for _, n in b.shards]
    assert torch.equal(a.tensor(NAME), b.tensor(NAME))
    for col in a.meta:
        assert torch.equal(a.meta[col], b.meta[col]) or a.meta[col].isnan().all() and b.meta[col].isnan().all(), col


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_lens, tmp_path):
    lens = tiny_lens("clip")
    imgs = [sample_image(i) for i in range(9)]
    kw = dict(dtype="float16", batch_size=2, shard_tokens=30, progress=False)
    whole = write_activations(lens, imgs, NAME, tmp_path / "whole", **kw)
    with pytest.raises(KeyboardInterrupt):
        write_activations(lens, Dying(imgs, 7), NAME, tmp_path / "cut", **kw)
    part = json.loads((tmp_path / "cut" / "parts" / "rank-00000-of-00001.json").read_text())
    assert not part["complete"] and part["items_done"] == 6 and len(part["shards"]) == 3  # 2 images = 34 tokens
    with pytest.warns(UserWarning, match="incomplete"):
        partial = ActivationStore(tmp_path / "cut")
    assert len(partial) == 6 * 17
    done = [(tmp_path / "cut" / s["file"]).stat() for s in part["shards"]]
    resumed = write_activations(lens, imgs, NAME, tmp_path / "cut", **kw)
    assert resumed.complete
    _same(resumed, whole)
    after = [(tmp_path / "cut" / s["file"]).stat() for s in part["shards"]]
    assert [(s.st_ino, s.st_mtime_ns) for s in done] == [(s.st_ino, s.st_mtime_ns) for s in after]  # not rewritten
    again = write_activations(lens, imgs, NAME, tmp_path / "cut", **kw)  # complete: nothing to do
    _same(again, whole)


def test_resume_refuses_a_store_written_for_something_else(tiny_lens, tmp_path):
    lens = tiny_lens("clip")
    imgs = [sample_image(i) for i in range(2)]
    write_activations(lens, imgs, NAME, tmp_path / "s", progress=False)
    for change, what in ((dict(names="vision.blocks.0.resid_post"), "names"), (dict(dtype="float32"), "dtype"),
                         (dict(data=imgs[:1]), "items")):
        args = {"names": NAME, "data": imgs, **change}
        with pytest.raises(ValueError, match=f"something else.*{what}"):
            write_activations(lens, args["data"], args["names"], tmp_path / "s", progress=False,
                              **{k: v for k, v in change.items() if k == "dtype"})
    with pytest.raises(FileExistsError, match="resume=True"):
        write_activations(lens, imgs, NAME, tmp_path / "s", resume=False, progress=False)


def test_ranks_write_their_own_slices(tiny_lens, tmp_path, monkeypatch):
    lens = tiny_lens("clip")
    imgs = [sample_image(i) for i in range(5)]
    single = write_activations(lens, imgs, NAME, tmp_path / "one", dtype="float32", batch_size=2, progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):  # what torchrun's two processes do, one after the other
        monkeypatch.setenv("RANK", str(rank))
        write_activations(lens, imgs, NAME, tmp_path / "two", dtype="float32", batch_size=2, progress=False)
        part = json.loads((tmp_path / "two" / "parts" / f"rank-{rank:05d}-of-00002.json").read_text())
        assert part["complete"] and part["items_done"] == len(range(rank, 5, 2))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    two = ActivationStore(tmp_path / "two")
    assert two.complete and two.world_size == 2 and len(two) == len(single)
    start = 0
    for path, n in two.shards:  # each rank's shards hold only its examples
        rank = int(path.name.split("-")[1])
        assert (two.meta["example"][start:start + n] % 2 == rank).all()
        start += n
    key = lambda s: s.meta["example"] * 100 + s.meta["position"]  # noqa: E731
    o1, o2 = torch.argsort(key(single)), torch.argsort(key(two))
    assert torch.equal(key(single)[o1], key(two)[o2])
    assert torch.equal(single.tensor(NAME)[o1], two.tensor(NAME)[o2])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_gloo(tiny_folder, tiny_lens, tmp_path):
    import torch.multiprocessing as mp

    from ._dist_worker import images, worker

    model = str(tiny_folder("clip"))
    mp.spawn(worker, args=(2, model, str(tmp_path / "store"), str(tmp_path), _free_port()), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["complete"] and r["tokens"] == 5 * 17 for r in ranks)
    a, b = set(ranks[0]["seen"]), set(ranks[1]["seen"])
    assert not a & b and len(ranks[0]["seen"]) + len(ranks[1]["seen"]) == 5 * 17  # disjoint, each token once
    assert a | b == {e * 100 + p for e in range(5) for p in range(17)} and abs(len(a) - len(b)) <= 1
    store = ActivationStore(tmp_path / "store")
    single = write_activations(tiny_lens("clip"), images(), NAME, tmp_path / "one", dtype="float32", batch_size=2,
                               progress=False)
    key = lambda s: s.meta["example"] * 100 + s.meta["position"]  # noqa: E731
    torch.testing.assert_close(store.tensor(NAME)[torch.argsort(key(store))],
                               single.tensor(NAME)[torch.argsort(key(single))], atol=1e-6, rtol=1e-6)
