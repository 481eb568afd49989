"""Property fuzz of the Lens entry points (mmlens.testing.fuzz): every drawn call is ok and leaves nothing behind.

The benchmark (benchmarks/reliability.py) runs thousands of the same cases; here hypothesis draws a few dozen seeds.
The second half checks the oracle itself: deliberately wrong outcomes must be classified as such.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mmlens.testing.fuzz import (BOOM, Arg, Case, FuzzHookError, Fuzzer, Outcome, classify, leaks, mentions,
                                 snapshot)


@pytest.fixture(scope="module")
def fuzzer(tiny_folder):
    return Fuzzer(tiny_folder, timeout=60)


@settings(max_examples=60, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])  # a seed has nothing to shrink
@given(seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_fuzzed_calls_are_ok_and_leave_nothing(fuzzer, seed):
    case, outcome, cls, why = fuzzer.check(seed)
    assert cls == "ok", f"{cls}: {why}\ncase: {case.describe()}\n{outcome.trace or ''}"
    assert not outcome.leaked, f"left behind: {outcome.leaked}\ncase: {case.describe()}"


# ---------------------------------------------------------------------------------------- the oracle itself
def _case(fuzzer, arch="clip", entry="run_with_cache", **args) -> Case:
    """A hand-made case: every argument omitted unless given."""
    a = {k: Arg(f"{k}:omitted", None, omit=True)
         for k in ("hooks", "attn_rows", "attn_heads", "cache_dtype", "cache_device", "grad", "extra")}
    a["inputs"] = Arg("inputs:dict", "dict")
    a.update(args)
    case = Case(0, arch, entry, "b1", a)
    fuzzer._settle(case, fuzzer.info(arch, "b1"))
    return case


def _invalid_dtype_case(fuzzer):
    return _case(fuzzer, names=Arg("names:exact", ("value", "vision.blocks.0.resid_post")),
                 cache_dtype=Arg("cache_dtype:int8", torch.int8, valid=False, culprits=("cache_dtype",)))


def test_classifier_marks_accepted_invalid_input_silent_wrong(fuzzer):
    case = _invalid_dtype_case(fuzzer)
    assert not case.valid and case.culprits == ("cache_dtype",)
    assert classify(case, Outcome())[0] == "silent_wrong"  # a fake "it succeeded"
    assert classify(case, Outcome(error=ValueError("cache_dtype=torch.int8 is not a floating dtype")))[0] == "ok"
    assert classify(case, Outcome(error=ValueError("bad dtype")))[0] == "unclear"
    assert classify(case, Outcome(error=AttributeError("'NoneType' has no attribute 'cache_dtype'")))[0] == "crash"
    assert classify(case, Outcome(timed_out=True))[0] == "hang"


def test_classifier_marks_valid_failures(fuzzer):
    case = _case(fuzzer, names=Arg("names:exact", ("value", "vision.blocks.0.resid_post")))
    assert case.valid
    assert classify(case, Outcome())[0] == "ok"
    assert classify(case, Outcome(mismatch="values differ"))[0] == "silent_wrong"
    assert classify(case, Outcome(error=ValueError("names: ...")))[0] == "crash"
    case.raises = True  # a hook that raises must see its exception come out unchanged
    assert classify(case, Outcome())[0] == "silent_wrong"
    assert classify(case, Outcome(error=FuzzHookError(BOOM)))[0] == "ok"
    assert classify(case, Outcome(error=RuntimeError("wrapped")))[0] == "crash"


def test_culprit_must_be_named_as_a_word():
    assert mentions("steps: step 7 is out of range", "steps")
    assert not mentions("num_inference_steps must be a positive int", "steps")
    assert not mentions("hooks: unknown hook point 'x'. Closest valid names: a, b", "names")
    assert mentions("names must hold strings", "names")
    assert mentions("hook on 'vision.blocks.0.resid_post' returned tuple", "vision.blocks.0.resid_post")


def test_oracle_catches_a_tampered_cache(fuzzer):
    name = "vision.blocks.0.resid_post"
    case = _case(fuzzer, names=Arg("names:exact", ("value", name)))
    log: list = []
    output, cache = fuzzer._call(case, log)()
    assert fuzzer.verify(case, (output, cache), log, []) is None
    cache._store[name][0] = cache._store[name][0] + 1e-3
    assert "differ" in fuzzer.verify(case, (output, cache), log, [])


def test_oracle_catches_wrong_attention_rows(fuzzer):
    name = "lm.blocks.1.attn.pattern"
    case = _case(fuzzer, "llava", names=Arg("names:pattern", ("value", [name])),
                 attn_rows=Arg("attn_rows:neg", ("list", [-1])))
    assert case.valid and case.plan.rows[name] == ("list", [-1])
    log: list = []
    output, cache = fuzzer._call(case, log)()
    assert fuzzer.verify(case, (output, cache), log, []) is None
    full = fuzzer.lens("llava").run_with_cache(fuzzer.inputs("llava", "b1"), names=name)[1][name]
    cache._store[name][0] = full[:, :, :1]  # row 0 instead of the last one: same shape, rows still sum to 1
    assert "differ" in fuzzer.verify(case, (output, cache), log, [])


def test_oracle_catches_an_injected_library_bug(fuzzer, monkeypatch):
    """cache_dtype silently ignored: a valid case becomes silent_wrong."""
    from mmlens.hooks.cache import ActivationCache

    monkeypatch.setattr(ActivationCache, "record",
                        lambda self, n, v: self._store.setdefault(n, []).append(v.detach().clone()))
    case = _case(fuzzer, names=Arg("names:exact", ("value", "vision.blocks.0.resid_post")),
                 cache_dtype=Arg("cache_dtype:float16", torch.float16))
    out = fuzzer.run(case)
    assert classify(case, out) == ("silent_wrong", "vision.blocks.0.resid_post: recorded as torch.float32, "
                                                   "expected torch.float16")


def test_leak_snapshot_sees_a_left_hook(fuzzer):
    lens = fuzzer.lens("clip")
    before = snapshot(lens)
    handle = lens.sites["vision.blocks.0.resid_post"].module.register_forward_hook(lambda *a: None)
    try:
        left = leaks(before, snapshot(lens))
    finally:
        handle.remove()
    assert list(left) == ["hooks"] and "vision_model.encoder.layers.0" in left["hooks"][0]
    assert leaks(before, snapshot(lens)) == {}
