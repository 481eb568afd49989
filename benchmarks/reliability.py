"""Reliability of the Lens entry points: fuzzed calls, leaks after raising hooks, memory, nesting, ordering, threads.

JSON lines on stdout (and appended to --out), each {"bench": "reliability", "figure": ..., "value": ..., "goal": ...}.
Seeded and deterministic in its cases; random tiny weights (built once under --models). CPU.

(a) fuzz (`mmlens.testing.fuzz`): `--cases` calls (default 3,000) on tiny clip, siglip, llava, qwen2_vl, blip2,
    sd, sd_classic (SD with diffusers' classic AttnProcessor), pixart and sd3 (2 steps, 32x32), every argument drawn
    valid or invalid. Classes: ok, silent_wrong (invalid accepted, or a valid result that differs from the plain-hook
    oracle), crash (a valid call raised, or an exception other than TypeError/ValueError/KeyError/
    NotImplementedError), unclear (right kind, but the message names neither the argument nor the hook point or key),
    hang (over the per-case limit). Goals: 0 silent_wrong, crash, unclear, hang; 0 cases leaving anything behind.
    `fuzz_errors_without_allowed_hint` counts errors that name the culprit but not (by a word heuristic: "must",
    "allowed", "expected", "did you mean", ...) what is allowed; it is reported, not folded into `unclear`.
(b) leaks: every entry point (run_with_cache, hooks + lens(...), generate, run_with_cache on a pipeline, hooks on
    attention patterns with edits, a raise inside the `with` body, nested sessions, sessions exited out of order)
    x a hook raising RuntimeError / KeyboardInterrupt, on transformers models and diffusion pipelines: hooks,
    attention processors, transformers attention-table entries and mmlens state left (goal 0), whether the
    exception came out unchanged, and whether a plain call afterwards equals the one before.
(c) memory: RSS growth (/proc/self/statm) over 1,000 `run_with_cache` calls after warm-up (goal < 1%) and over 100
    `generate` calls.
(d) nesting / ordering / threads: nested sessions on one diffusers attention site (sd, sd classic AttnProcessor,
    sd3, pixart: failures / runs, maps checked against the oracle), sessions exited out of order (later calls that
    still fired a closed session's hook / runs), one Lens used from two threads (runs where the second thread was
    NOT refused with LensBusyError / runs), two lenses capturing patterns in two threads (lost or wrong maps / 300),
    two SD pipelines in two threads (runs with wrong maps).

Out of scope, on purpose: GPUs and accelerate device maps (CPU only; "cuda" is an invalid cache_device here when
torch has no CUDA); paligemma and llava_full (same code paths as llava/siglip, covered by the unit tests); the
`captures=` argument of lens.hooks, token_map/unembed/project, cache save/load, and generation with pipeline
callbacks (their own tests). The fuzz oracle's attention maps are recomputed from the arguments of each
`F.scaled_dot_product_attention` call (or read from the classic processor's softmax), and are checked once per
model against transformers' own eager softmax. Judgement calls counted as invalid: cache_device="meta" (a cache
that holds no values), grad=None, num_inference_steps=0 / 2.5 also through lens(...) (generate refuses them).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

BENCH = "reliability"
LEAK_ARCHS = ("clip", "llava", "qwen2_vl", "blip2", "sd", "sd_classic", "pixart", "sd3")


class Out:
    def __init__(self, path: str | None):
        self.path, self.lines = path, []

    def __call__(self, figure: str, value, goal=None, **kw) -> dict:
        line = {"bench": BENCH, "figure": figure, "value": value, "goal": goal, **kw}
        print(json.dumps(line, default=str), flush=True)
        self.lines.append(line)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(line, default=str) + "\n")
        return line


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------------------------ (a)
def fuzz(fz, out: Out, cases: int, seed: int, examples: int) -> dict:
    from mmlens.testing.fuzz import CLASSES, says_what_is_allowed

    t0 = time.perf_counter()
    total = collections.Counter()
    by_arch: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_entry: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    coverage = collections.Counter()
    leaked, no_hint, shown = [], [], collections.Counter()
    seen_reasons = set()
    slowest = 0.0
    for i in range(cases):
        case_seed = seed * 1_000_000 + i
        case, outcome, cls, why = fz.check(case_seed)
        total[cls] += 1
        by_arch[case.arch][cls] += 1
        by_entry[case.entry][cls] += 1
        slowest = max(slowest, outcome.seconds)
        coverage["valid" if case.valid else "invalid"] += 1
        coverage["hook_raises"] += case.raises
        kinds = [k for ch in case.plan.chains.values() for k in ch]
        coverage["pattern_edits"] += case.valid and any(k.startswith("p_") for k in kinds)
        coverage["value_edits"] += case.valid and any(k in ("scale", "f64", "half", "round") for k in kinds)
        coverage["selections"] += case.valid and bool(case.plan.rows or case.plan.heads)
        coverage["grad"] += case.valid and case.args.get("grad") is not None and case.args["grad"].spec is True
        if outcome.leaked:
            leaked.append({"case": case.describe(), "left": outcome.leaked})
        err = outcome.error
        if cls == "ok" and err is not None and not case.raises and not says_what_is_allowed(str(err)):
            no_hint.append({"case": case.describe(), "message": outcome.message[:300]})
        if cls != "ok":
            sig = (cls, case.arch, why[:40])
            if shown[cls] < examples and sig not in seen_reasons:
                seen_reasons.add(sig)
                shown[cls] += 1
                out("fuzz_example", cls, None, case=case.describe(), reason=why[:500])
    seconds = time.perf_counter() - t0
    out("fuzz_cases", cases, None, seed=seed, seconds=round(seconds, 1), slowest_case_s=round(slowest, 2),
        timeout_s=fz.timeout)
    for cls in CLASSES:
        out(f"fuzz_{cls}", total[cls], None if cls == "ok" else 0)
    out("fuzz_cases_leaving_entries", len(leaked), 0, examples=leaked[:examples])
    out("fuzz_errors_without_allowed_hint", len(no_hint), 0, examples=no_hint[:examples])
    for arch, c in sorted(by_arch.items()):
        out("fuzz_by_arch", sum(c.values()), None, arch=arch, **{k: c[k] for k in CLASSES})
    for entry, c in sorted(by_entry.items()):
        out("fuzz_by_entry", sum(c.values()), None, entry=entry, **{k: c[k] for k in CLASSES})
    out("fuzz_coverage", cases, None, **coverage)
    return {"cases": cases, **{k: total[k] for k in CLASSES}, "leaking_cases": len(leaked),
            "no_allowed_hint": len(no_hint), "seconds": round(seconds, 1)}


# ------------------------------------------------------------------------------------------------------ (b)
class Boom(RuntimeError):
    pass


def _raiser(kind):
    def fn(x, ctx):
        raise kind("reliability: raised on purpose")
    return fn


def _sites(lens, arch):
    """(value site, second value site, pattern site, second pattern site), denoiser sites for pipelines."""
    pts = lens.hook_points()
    den = getattr(lens.adapter, "denoiser", None)

    def pick(suffix, denoiser=True):
        cands = [n for n in pts if n.endswith(suffix)]
        if den is not None:
            cands = [n for n in cands if lens.sites[n].path.startswith(den + ".") == denoiser]
        return cands

    pats = pick(".pattern")
    vals = pick("resid_post") or pick(".out")
    return vals[0], vals[-1], pats[0], pats[-1]


def _plain(fz, arch):
    lens = fz.lens(arch)
    with torch.no_grad():
        if arch in fz_diffusion():
            return torch.as_tensor(lens.model(**fz.pipe_kwargs(arch, "cfg")).images)
        out = lens.model(**fz.inputs(arch, "b1"))
        return next(v for v in out.values() if isinstance(v, torch.Tensor))


def fz_diffusion():
    from mmlens.testing.fuzz import DIFFUSION

    return DIFFUSION


def _scenarios(fz, arch, exc):
    """name -> thunk raising `exc` from a hook (or the with-body) through one entry point."""
    lens = fz.lens(arch)
    diff = arch in fz_diffusion()
    v1, v2, p1, p2 = _sites(lens, arch)
    boom = _raiser(exc)
    read = lambda x, ctx: None  # noqa: E731
    uniform = lambda p, ctx: torch.full_like(p, 1.0 / p.shape[-1])  # noqa: E731

    def call():
        if diff:
            return lens(**fz.pipe_kwargs(arch, "cfg"))
        return lens(fz.inputs(arch, "b1"))

    def rwc(**kw):
        if diff:
            return lens.run_with_cache(fz.pipe_kwargs(arch, "cfg"), **kw)
        return lens.run_with_cache(fz.inputs(arch, "b1"), **kw)

    def in_block():
        with lens.hooks({v1: read, p1: read}):
            call()
            raise exc("reliability: raised in the with body")

    def nested():
        with lens.hooks({p1: read}), lens.hooks({v1: read}):
            rwc(names=[p2, v2], hooks={v2: boom})

    def out_of_order():
        one, two = lens.hooks({p1: read, v1: read}), lens.hooks({v2: boom, p2: read})
        one.__enter__()
        two.__enter__()
        try:
            call()
        except BaseException as e:
            one.__exit__(type(e), e, e.__traceback__)
            two.__exit__(type(e), e, e.__traceback__)
            raise
        one.__exit__(None, None, None)
        two.__exit__(None, None, None)

    def hooks_call():
        with lens.hooks({v1: [read, boom], p1: read}):
            call()

    def pattern_edit():
        with lens.hooks({p1: uniform, p2: [uniform, boom]}):
            call()

    out = {"run_with_cache": lambda: rwc(names="*", hooks={v1: boom}),
           "run_with_cache_pattern_hook": lambda: rwc(names="*", hooks={p1: boom}),
           "hooks+call": hooks_call, "pattern_edit": pattern_edit, "raise_in_with_body": in_block,
           "nested_sessions": nested, "out_of_order_exit": out_of_order}
    if diff:
        kw = {k: v for k, v in fz.pipe_kwargs(arch, "cfg").items() if k != "prompt"}
        out["generate"] = lambda: lens.generate("a red square", names="*", hooks={v1: boom}, progress=False, **kw)
        out["generate_pattern_hook"] = lambda: lens.generate("a red square", names=[p1], hooks={p2: boom},
                                                             progress=False, **kw)
        te = [n for n in lens.hook_points() if n.startswith("text_encoder") and n.endswith(".pattern")]
        if te:  # a transformers kernel inside a pipeline
            out["generate_text_encoder_pattern_hook"] = lambda: lens.generate(
                "a red square", names=[te[0]], hooks={te[-1]: boom}, progress=False, **kw)
    return out


def leaks(fz, out: Out, archs) -> dict:
    from mmlens.testing.fuzz import leaks as diff_snapshots
    from mmlens.testing.fuzz import snapshot

    total_left, combos, not_propagated, not_restored = 0, 0, 0, 0
    for arch in archs:
        for exc in (Boom, KeyboardInterrupt):
            arch_left, arch_failures, names = 0, [], []
            for name, thunk in _scenarios(fz, arch, exc).items():
                names.append(name)
                lens = fz.lens(arch)
                ref = _plain(fz, arch)
                before = snapshot(lens)
                caught = None
                try:
                    thunk()
                except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt on purpose
                    caught = e
                left = diff_snapshots(before, snapshot(lens))
                n_left = sum(len(v) for v in left.values())
                propagated = isinstance(caught, exc) and "raised" in str(caught)
                after = _plain(fz, arch)
                restored = bool(torch.equal(ref, after)) and not diff_snapshots(before, snapshot(lens))
                total_left += n_left
                arch_left += n_left
                combos += 1
                not_propagated += not propagated
                not_restored += not restored
                if left or not propagated or not restored:
                    arch_failures.append({"entry": name, "entries_left": n_left, "propagated": propagated,
                                          "later_call_unchanged": restored, "left": {k: v[:4] for k, v in left.items()},
                                          "raised": f"{type(caught).__name__}: {caught}"[:200]})
                if left:
                    fz.repair(arch)
            out("leak_entries_left", arch_left, 0, arch=arch, exception=exc.__name__, entry_points=names,
                failures=arch_failures)
    out("leak_entries_left_total", total_left, 0, combinations=combos)
    out("leak_exception_not_propagated", not_propagated, 0, combinations=combos)
    out("leak_later_call_changed", not_restored, 0, combinations=combos)
    return {"entries_left": total_left, "combinations": combos, "not_propagated": not_propagated,
            "later_call_changed": not_restored}


# ------------------------------------------------------------------------------------------------------ (c)
def memory(fz, out: Out, runs: int, gen_runs: int) -> dict:
    res = {}
    lens = fz.lens("llava")
    inputs = fz.inputs("llava", "b1")
    names = lens.hook_points()  # every site, attention maps included
    hooks = {"lm.blocks.0.mlp.out": lambda x, ctx: x * 1.0, "vision.blocks.0.attn.pattern": lambda p, ctx: None}

    def one():
        _, cache = lens.run_with_cache(inputs, names=names, hooks=hooks, attn_rows=[-1])
        del cache

    for _ in range(100):
        one()
    gc.collect()
    r0, t0 = rss_bytes(), time.perf_counter()
    mid = None
    for i in range(runs):
        one()
        if i == runs // 2:
            gc.collect()
            mid = rss_bytes()
    gc.collect()
    r1 = rss_bytes()
    pct = 100 * (r1 - r0) / r0
    res["run_with_cache_pct"] = round(pct, 3)
    out("memory_growth_run_with_cache_pct", round(pct, 3), "< 1", runs=runs, rss_start_mib=round(r0 / 2**20, 1),
        rss_mid_mib=round(mid / 2**20, 1), rss_end_mib=round(r1 / 2**20, 1), names=len(names), arch="llava",
        seconds=round(time.perf_counter() - t0, 1))

    sd = fz.lens("sd")
    kw = {k: v for k, v in fz.pipe_kwargs("sd", "cfg").items() if k not in ("prompt", "generator")}
    site = "unet.mid.attn.0.cross.pattern"

    def gen():
        _, cache = sd.generate("a red square", names=["unet.*.resid_post", site],
                               hooks={"unet.mid.out": lambda x, c: None}, progress=False,
                               generator=torch.Generator().manual_seed(0), **kw)
        del cache

    for _ in range(10):
        gen()
    gc.collect()
    r0, t0 = rss_bytes(), time.perf_counter()
    for _ in range(gen_runs):
        gen()
    gc.collect()
    r1 = rss_bytes()
    pct = 100 * (r1 - r0) / r0
    res["generate_pct"] = round(pct, 3)
    out("memory_growth_generate_pct", round(pct, 3), "< 1", runs=gen_runs, rss_start_mib=round(r0 / 2**20, 1),
        rss_end_mib=round(r1 / 2**20, 1), arch="sd", seconds=round(time.perf_counter() - t0, 1))
    return res


# ------------------------------------------------------------------------------------------------------ (d)
SD_SITES = {"sd": "unet.mid.attn.0.cross.pattern", "sd_classic": "unet.mid.attn.0.cross.pattern",
            "pixart": "dit.blocks.0.cross.pattern", "sd3": "dit.blocks.0.joint.pattern"}


def nested_diffusers(fz, out: Out, runs: int) -> dict:
    from mmlens.testing.fuzz import Plan, snapshot

    res = {}
    for arch, site in SD_SITES.items():
        lens = fz.lens(arch)
        kw = {k: v for k, v in fz.pipe_kwargs(arch, "cfg").items() if k != "prompt"}
        oracle = fz._reference(arch, "cfg", Plan(records=[site], cfg=True, branches_cfg=True), "generate", {})
        expected = [v for _, v in oracle.records[site]]
        failures, reasons = 0, []
        for _ in range(runs):
            before = snapshot(lens)
            outer = []
            with lens.hooks(captures={site: [lambda p, ctx: outer.append(p.clone())]}):
                kw["generator"] = torch.Generator().manual_seed(0)
                _, cache = lens.generate("a red square", names=site, progress=False, **kw)
            inner = cache.calls(site) if site in cache else []
            why = None
            if len(outer) != len(expected) or len(inner) != len(expected):
                why = f"outer saw {len(outer)}, inner {len(inner)}, expected {len(expected)} maps"
            elif any(not torch.allclose(a, e, atol=1e-5) or not torch.allclose(b, e, atol=1e-5)
                     for a, b, e in zip(outer, inner, expected)):
                why = "maps differ from the oracle"
            elif snapshot(lens) != before:
                why = "state not restored"
            if why:
                failures += 1
                reasons.append(why)
        res[arch] = failures
        out("nested_sessions_one_diffusers_site_failures", failures, 0, runs=runs, arch=arch, site=site,
            reasons=reasons[:3])
    return res


def out_of_order(fz, out: Out, runs: int) -> dict:
    from mmlens.testing.fuzz import snapshot

    res = {}
    for arch, site in (("llava", "lm.blocks.0.attn.pattern"), ("llava", "lm.blocks.0.mlp.out"),
                       ("clip", "vision.blocks.1.attn.z"), ("sd", "unet.mid.attn.0.cross.pattern"),
                       ("sd3", "dit.blocks.0.joint.pattern"), ("sd", "unet.mid.out")):
        lens = fz.lens(arch)
        diff = arch in fz_diffusion()

        def run():
            if diff:
                lens(**fz.pipe_kwargs(arch, "nocfg"))
            else:
                lens(fz.inputs(arch, "b1"))

        bad = 0
        for _ in range(runs):
            before = snapshot(lens)
            calls = []
            one = lens.hooks({site: lambda v, ctx: calls.append(1)})
            two = lens.hooks({site: lambda v, ctx: calls.append(2)})
            one.__enter__()
            two.__enter__()
            one.__exit__(None, None, None)
            run()
            fired_closed = 1 in calls or 2 not in calls
            two.__exit__(None, None, None)
            calls.clear()
            run()
            bad += bool(fired_closed or calls or snapshot(lens) != before)
        res[f"{arch}:{site}"] = bad
        out("out_of_order_exit_closed_session_fired", bad, 0, runs=runs, arch=arch, site=site)
    return res


def same_lens_threads(fz, out: Out, runs: int) -> dict:
    from mmlens.errors import LensBusyError

    lens = fz.lens("clip")
    inputs = fz.inputs("clip", "b1")
    not_refused, refused_after, hung = 0, 0, 0
    for k in range(runs):
        got = []

        def other():
            try:
                if k % 2:
                    lens(inputs)
                else:
                    lens.run_with_cache(inputs, names="vision.blocks.0.resid_post")
                got.append("ran")
            except LensBusyError:
                got.append("busy")
            except BaseException as e:  # noqa: BLE001
                got.append(type(e).__name__)

        with lens.hooks({"vision.blocks.0.resid_post": lambda x, c: None}):
            t = threading.Thread(target=other)
            t.start()
            t.join(30)
            hung += t.is_alive()
        not_refused += got != ["busy"]
        got.clear()
        t = threading.Thread(target=other)  # free again once the block is closed
        t.start()
        t.join(30)
        refused_after += got != ["ran"]
    out("same_lens_two_threads_not_refused", not_refused, 0, runs=runs, refused_after_block_closed=refused_after,
        hung=hung)
    return {"not_refused": not_refused, "refused_after": refused_after, "hung": hung}


def two_lenses_threads(fz, out: Out, runs_per_thread: int, models: str) -> dict:
    import mmlens
    from mmlens.testing.tiny_models import build
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    folder_b = os.path.join(models, "llava_b")
    if not os.path.exists(os.path.join(folder_b, ".complete")):
        build("llava", folder_b, seed=1)
        open(os.path.join(folder_b, ".complete"), "w").write("ok")
    lenses = [mmlens.load(os.path.join(models, "llava")), mmlens.load(folder_b)]
    inputs = fz.inputs("llava", "b2")
    names = "*.attn.pattern"
    ref = [lens.run_with_cache(inputs, names=names)[1] for lens in lenses]
    table = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    bad = []

    def work(k):
        for i in range(runs_per_thread):
            rows = [-1] if i % 3 == 0 else None
            try:
                _, c = lenses[k].run_with_cache(inputs, names=names, attn_rows=rows)
                ok = set(c) == set(ref[k]) and all(
                    torch.allclose(c[n], ref[k][n] if rows is None else ref[k][n][:, :, -1:], atol=1e-6) for n in c)
            except Exception:  # noqa: BLE001  a run that raised counts as wrong (a thread's error is otherwise lost)
                ok = False
            if not ok:
                bad.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    restored = dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == table
    out("two_lenses_two_threads_wrong_patterns", len(bad), 0, runs=2 * runs_per_thread, table_restored=restored,
        seconds=round(time.perf_counter() - t0, 1))
    return {"wrong": len(bad), "runs": 2 * runs_per_thread, "table_restored": restored}


def two_pipelines_threads(fz, out: Out, runs_per_thread: int, models: str) -> dict:
    import mmlens

    a, b = mmlens.load(os.path.join(models, "sd")), mmlens.load(os.path.join(models, "sd"))
    for p in (a, b):
        p.model.set_progress_bar_config(disable=True)
    name = "unet.mid.attn.0.cross.pattern"
    kw = {k: v for k, v in fz.pipe_kwargs("sd", "nocfg").items() if k not in ("prompt", "generator")}

    def run(lens, prompt):
        return lens.generate(prompt, names=name, generator=torch.Generator().manual_seed(0), progress=False, **kw)[1]

    ref = {"a red square": run(a, "a red square"), "a blue circle": run(b, "a blue circle")}
    bad = []

    def work(lens, prompt):
        for _ in range(runs_per_thread):
            try:
                c = run(lens, prompt)
                same = c.steps == [0, 1] and all(
                    torch.allclose(c.get(name, step=t), ref[prompt].get(name, step=t), atol=1e-6) for t in (0, 1))
            except Exception:  # noqa: BLE001  a run that raised counts as wrong
                same = False
            if not same:
                bad.append(prompt)

    threads = [threading.Thread(target=work, args=(a, "a red square")),
               threading.Thread(target=work, args=(b, "a blue circle"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    out("two_pipelines_two_threads_wrong_maps", len(bad), 0, runs=2 * runs_per_thread)
    return {"wrong": len(bad), "runs": 2 * runs_per_thread}


# ------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=3000, help="fuzz cases (default 3000)")
    ap.add_argument("--seed", type=int, default=0, help="fuzz seed: case k uses seed * 1e6 + k")
    ap.add_argument("--archs", default="clip,siglip,llava,qwen2_vl,blip2,sd,sd_classic,pixart,sd3")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-case limit in seconds (hang)")
    ap.add_argument("--examples", type=int, default=8, help="examples per non-ok class")
    ap.add_argument("--memory-runs", type=int, default=1000)
    ap.add_argument("--generate-runs", type=int, default=100)
    ap.add_argument("--thread-runs", type=int, default=150, help="per thread, two lenses capturing patterns")
    ap.add_argument("--repeats", type=int, default=10, help="runs of the nesting / ordering / thread checks")
    ap.add_argument("--sections", default="fuzz,leaks,memory,nesting", help="any of fuzz,leaks,memory,nesting")
    ap.add_argument("--models", default=os.path.join(tempfile.gettempdir(), "mmlens-reliability-models"),
                    help="folder of the tiny models (built when missing)")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(args.seed)
    import diffusers
    import transformers

    import mmlens
    from mmlens.testing.fuzz import ARCHS, Fuzzer, build_all

    out = Out(args.out)
    t0 = time.perf_counter()
    archs = tuple(a for a in args.archs.split(",") if a)
    folders = build_all(args.models, tuple(dict.fromkeys([*archs, *ARCHS, "sd_classic"])))
    fz = Fuzzer(folders, archs=archs, timeout=args.timeout)
    sections = set(args.sections.split(","))
    out("meta", None, None, torch=torch.__version__, transformers=transformers.__version__,
        diffusers=diffusers.__version__, mmlens=mmlens.__version__, host=platform.node(),
        python=platform.python_version(),
        threads=torch.get_num_threads(), archs=list(archs))
    summary: dict = {}
    if "fuzz" in sections:
        summary["fuzz"] = fuzz(fz, out, args.cases, args.seed, args.examples)
    if "leaks" in sections:
        summary["leaks"] = leaks(fz, out, [a for a in LEAK_ARCHS if a in folders])
    if "memory" in sections:
        summary["memory"] = memory(fz, out, args.memory_runs, args.generate_runs)
    if "nesting" in sections:
        summary["nested_diffusers"] = nested_diffusers(fz, out, args.repeats)
        summary["out_of_order"] = out_of_order(fz, out, args.repeats)
        summary["same_lens_threads"] = same_lens_threads(fz, out, 5 * args.repeats)
        summary["two_lenses_threads"] = two_lenses_threads(fz, out, args.thread_runs, args.models)
        summary["two_pipelines_threads"] = two_pipelines_threads(fz, out, args.repeats, args.models)
    out("summary", None, None, seconds=round(time.perf_counter() - t0, 1), **summary)


if __name__ == "__main__":
    main()
