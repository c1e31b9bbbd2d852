"""The quality benchmark (bench/quality) end to end on a tiny config-built Llama: no downloads, < 3 minutes.

Runs what ``python -m bench.quality all --tiny`` runs: tiny base pre-trained from scratch, 2 task types x
2 languages (+ 2 held-out adapters), one LoRA each (independent A), every row at K = 1..3 over 2 random
orders + the adversarial one, D2C vs K-Means vs random, the decoding cross-check; the outputs go to a
temporary folder, never bench/results. Also the pieces: scoring, bootstrap intervals, arrival orders.
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:       # `pytest` (not `python -m pytest`) does not put the repository root on the path
    sys.path.append(str(ROOT))  # after site-packages: kmerge_fast stays the installed one

pytestmark = pytest.mark.quality


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot when the cores are busy elsewhere."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_pipeline_end_to_end(tmp_path, one_thread):
    from bench.quality.__main__ import RESULTS, run_tiny
    from bench.quality.evaluate import STRATEGIES

    before = {p: p.stat().st_mtime for p in RESULTS.glob("quality.*")}
    start = time.perf_counter()
    results = run_tiny(tmp_path, log=lambda *a: None)     # asserts every stage ran and merging beats the base
    seconds = time.perf_counter() - start
    assert seconds < 180, f"tiny quality run took {seconds:.0f} s (CI budget: 3 minutes)"

    saved = json.loads((tmp_path / "quality.json").read_text())["arms"]["independent"]
    for key in ("model", "tasks", "n_adapters", "orders", "single", "summary", "d2c", "crosscheck", "train"):
        assert key in saved, key
    assert saved["n_adapters"] == 4 and len(saved["orders"]) == 3        # 2 random + the adversarial
    cells = saved["summary"]["cells"]
    assert set(cells) == set(STRATEGIES)
    for row in cells.values():
        assert set(row) == {"1", "2", "3"}
        for c in row.values():
            s, lo, hi = c["s"]
            assert c["orders"] == 2 and lo <= s <= hi and "s_adversarial" in c
    # K = 1 puts every task in one slot, whatever the row
    assert all(row["1"]["slots"] == [1, 1, 1] for row in cells.values())
    # D2C with its move sweeps, and the clustering it had before them (from the same fit)
    assert {"d2c", "d2c-alternation", "kmeans", "random"} <= set(saved["d2c"]["s"])
    assert saved["config"]["d2c_refine"] == 3
    # the adapters record their training, held-out score and how far A moved
    assert all(t["steps"] > 0 and t["a_moved"] > 0 and t["held_out"] is not None for t in saved["train"].values())
    # teacher-forced exact match equals greedy decoding's on every decoded example
    assert saved["crosscheck"]["agreement"] == 1.0, saved["crosscheck"]
    md = (tmp_path / "quality.md").read_text()
    assert "| kmerge-exact" in md and "Machine:" in md and "[" in md
    # `report` re-renders the markdown from the JSON alone
    (tmp_path / "quality.md").unlink()
    from bench.quality.__main__ import main
    main(["report", "--out", str(tmp_path)])
    assert "| kmerge-exact" in (tmp_path / "quality.md").read_text()
    # `d2c` re-runs only the clustering part: the online rows stay, the arm records the re-run
    main(["d2c", "--tiny", "--out", str(tmp_path), "--adapters", str(tmp_path / "adapters"), "--d2c-seeds", "2"])
    again = json.loads((tmp_path / "quality.json").read_text())["arms"]["independent"]
    assert again["summary"] == saved["summary"] and again["config"]["d2c_seeds"] == 2
    assert "d2c_run" in again and {"d2c", "kmeans", "random"} <= set(again["d2c"]["s"])
    assert "re-run" in (tmp_path / "quality.md").read_text()
    # the adapters are cached with a manifest under the output folder (4 streamed + 2 held out)
    manifests = list((tmp_path / "adapters").glob("*/manifest.json"))
    assert len(manifests) == 1 and len(json.loads(manifests[0].read_text())["train"]) == 6
    # merging beats the zero-shot base on average (also asserted by run_tiny)
    base = sum(results["base"].values()) / len(results["base"])
    merged = [c["exact"] for row in cells.values() for c in row.values()]
    assert sum(merged) / len(merged) > base
    # nothing written to bench/results
    assert {p: p.stat().st_mtime for p in RESULTS.glob("quality.*")} == before


def test_deadline_keeps_every_cell_on_the_first_order(monkeypatch):
    """Orders outermost: a run cut short has each (row, K) on order 0 before any gets order 1."""
    from conftest import random_lora

    from bench.quality import evaluate

    class Scores:  # stands in for the Scorer: the same per-example results for every adapter, no model
        def score_many(self, requests):
            return [{t: {"exact": [1, 0], "ll": [-1.0, -2.0]} for t in tasks} for _, tasks in requests]

        def save(self):
            pass

    adapters = {f"{kind}_{lang}": random_lora({"q": (6, 5)}, 2, seed=i)
                for i, (kind, lang) in enumerate([("date", "en"), ("date", "de"), ("typo", "en"), ("typo", "de")])}
    orders = evaluate.arrival_orders(list(adapters), 3)
    cells = 2 * 2  # rows x budgets
    clock = iter(range(10_000))
    # evaluate's own clock only: one tick per deadline check
    monkeypatch.setattr(evaluate, "time", types.SimpleNamespace(time=lambda: next(clock), perf_counter=time.perf_counter))
    out = evaluate.run_online(Scores(), adapters, [1, 2], orders, ["kmerge", "linear"], "auto",
                              deadline=cells + 1.5, log=lambda *_: None)  # every cell once, then 2 more
    done = [len(out["cells"][label][k]) for k in ("1", "2") for label in ("kmerge", "linear")]
    assert sorted(done) == [1, 1, 2, 2] and done[:2] == [2, 2]  # K=1 cells got the second order first
    assert len(out["skipped"]) == 3 * cells - 6 and all("order" in s for s in out["skipped"])


def test_deadline_is_the_next_such_utc_time():
    """--deadline HH:MM: today's when still ahead, tomorrow's once passed (a run started before midnight)."""
    import datetime as dt

    from bench.quality.__main__ import deadline_timestamp

    evening = dt.datetime(2026, 12, 4, 23, 40, tzinfo=dt.timezone.utc).timestamp()
    assert deadline_timestamp("23:55", evening) == evening + 15 * 60
    assert deadline_timestamp("01:15", evening) == evening + 95 * 60
    assert deadline_timestamp("23:40", evening) == evening + 24 * 3600   # now is not ahead
    for bad in ("1:2:3", "25:00", "noon", ""):
        with pytest.raises(SystemExit, match="--deadline"):
            deadline_timestamp(bad, evening)


def test_comparisons_pair_candidates_with_peers_and_routers_with_their_mode():
    from bench.quality.evaluate import comparisons

    pairs = dict(comparisons(["kmerge", "kmerge-iso", "kmerge-isonorm", "kmerge-isogeo", "kmerge-isoswitch", "ties",
                              "opcm", "oracle-isonorm", "kmerge++-isonorm", "kmerge++", "oracle-exact", "random"]))
    # only the peers that ran (no task_arithmetic, no kmerge-exact), never a row against itself
    assert pairs["kmerge-isoswitch"] == ["ties", "opcm", "kmerge", "kmerge-iso", "kmerge-isonorm", "kmerge-isogeo"]
    assert pairs["kmerge-isogeo"] == ["ties", "opcm", "kmerge", "kmerge-iso", "kmerge-isonorm"]
    assert pairs["kmerge-isonorm"] == ["ties", "opcm", "kmerge", "kmerge-iso", "kmerge-isogeo"]
    assert pairs["kmerge-iso"] == ["ties", "opcm", "kmerge", "kmerge-isonorm", "kmerge-isogeo"]
    assert pairs["oracle-isonorm"] == ["kmerge-isonorm"] and pairs["kmerge++-isonorm"] == ["kmerge-isonorm"]
    assert pairs["kmerge++"] == ["kmerge"]
    assert "oracle-exact" not in pairs and "random" not in pairs   # kmerge-exact did not run; not a router


def test_adversarial_order_groups_task_types():
    from bench.quality.evaluate import adversarial_order, arrival_orders

    tasks = [f"{k}_{l}" for l in ("en", "de", "fr") for k in ("date", "typo", "count")]
    assert adversarial_order(tasks) == ["date_en", "date_de", "date_fr", "typo_en", "typo_de", "typo_fr",
                                        "count_en", "count_de", "count_fr"]
    orders = arrival_orders(tasks, 3, adversarial=True)
    assert len(orders) == 4 and orders[-1] == adversarial_order(tasks)
    assert all(sorted(o) == sorted(tasks) for o in orders) and len({tuple(o) for o in orders}) == 4


def test_order_seed_draws_other_orders_and_is_reported():
    """--order-seed draws random orders the default seed did not (the adversarial one is the same), and the
    report lists it among the differences from the default configuration."""
    from bench.quality.evaluate import arrival_orders

    tasks = [f"{k}_{l}" for l in ("en", "de", "fr", "es") for k in ("date", "typo", "count", "reply", "extract")]
    default, other = arrival_orders(tasks, 5, adversarial=True), arrival_orders(tasks, 5, seed=1, adversarial=True)
    assert default == arrival_orders(tasks, 5, seed=0, adversarial=True) and default[-1] == other[-1]
    assert not {tuple(o) for o in default[:-1]} & {tuple(o) for o in other[:-1]}
    assert _config().order_seed == 0 and _config().reductions == []
    cfg = _config("--order-seed", "1")
    assert cfg.order_seed == 1 and len(cfg.reductions) == 1 and "seed 1" in cfg.reductions[0]


def test_bootstrap_intervals():
    import numpy as np

    from bench.quality import stats

    rng = np.random.default_rng(0)
    single = (rng.random((6, 32)) < 0.9).astype(float)
    # a merge that keeps the single adapter's answers: S = 1 in every replicate
    same = np.stack([single] * 3)
    assert stats.s_interval(same, single, 200) == pytest.approx((1.0, 1.0, 1.0))
    # a merge that loses about half of the answers: S near 0.5, an interval around it that excludes 1
    half = same * (rng.random(same.shape) < 0.5)
    s, lo, hi = stats.s_interval(half, single, 400)
    assert lo < s < hi and 0.3 < s < 0.7 and hi < 0.8
    d, dlo, dhi = stats.difference_interval(same, half, single, 400)
    assert d == pytest.approx(1.0 - s) and 0 < dlo < d < dhi
    assert stats.difference_interval(half, half, single, 100) == pytest.approx((0.0, 0.0, 0.0))
    # tasks whose single score is 0 are left out
    zero = single.copy()
    zero[0] = 0
    assert stats.s_point(np.stack([zero]), zero) == pytest.approx(1.0)
    m, mlo, mhi = stats.mean_interval(single, 200)
    assert mlo <= m <= mhi and m == pytest.approx(single.mean())


def test_teacher_forced_scoring_equals_greedy_and_ignores_the_shared_prefix(one_thread):
    """Scorer: the prefix cache changes nothing (float32), and exact match equals greedy decoding's."""
    from bench.quality import model as base
    from bench.quality.scoring import Scorer, generation_f1
    from bench.quality.tasks import dataset

    import numpy as np

    tests = {f"{k}_en": dataset(k, "en", 0, 12)[1] for k in ("reply", "count")}
    words = sorted({w for ex in tests.values() for e in ex for w in (e.prompt + " " + e.target).split()})
    tok = base.tiny_tokenizer(words)
    model = base.tiny_model(len(tok), seed=3).eval()
    # fit the model on half of the examples, so that some answers are right and some wrong
    from bench.quality.train import _batch, encode

    pairs = [encode(tok, e.prompt, e.target) for ex in tests.values() for e in ex[::2]]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        ids, mask, labels = _batch(pairs, tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    scorer = Scorer(model, tok, tests, batch_size=5)
    outcomes = set()
    try:
        assert all(scorer.prefix[t] > 0 for t in tests)       # the instruction is shared
        for t in tests:
            cached = scorer.run(t)
            keep, scorer.prefix[t] = scorer.prefix[t], 0
            plain = scorer.run(t)
            scorer.prefix[t] = keep
            assert cached["exact"] == plain["exact"]
            np.testing.assert_allclose(cached["ll"], plain["ll"], rtol=1e-4, atol=1e-4)
            greedy = generation_f1(model, tok, None, tests[t])
            assert greedy["exact"] == cached["exact"]
            outcomes.update(cached["exact"])
    finally:
        scorer.close()
    assert outcomes == {0, 1}, "the check needs right and wrong answers"


def test_scoring_workers_give_the_one_thread_scores_bit_for_bit(one_thread):
    """Two one-thread worker processes score exactly as this process does at one thread (bfloat16, several
    adapters, a pass requested twice is run once); a mismatched adapter is refused by name before any job
    leaves; a worker that dies is reported instead of waited for."""
    from conftest import random_lora

    from bench.quality import model as base
    from bench.quality.scoring import Scorer
    from bench.quality.tasks import dataset

    tests = {f"{k}_en": dataset(k, "en", 0, 6)[1] for k in ("reply", "count", "date")}
    words = sorted({w for ex in tests.values() for e in ex for w in (e.prompt + " " + e.target).split()})
    tok = base.tiny_tokenizer(words)
    model = base.tiny_model(len(tok), seed=5).to(torch.bfloat16).eval()
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
              if n.endswith(("q_proj", "v_proj", "o_proj"))}
    loras = [random_lora(shapes, 4, scaling=2.0, seed=s) for s in range(3)]
    tasks = list(tests)
    requests = [(None, tasks), (loras[0], tasks), (loras[1], tasks[:2]), (loras[0], tasks[1:]), (loras[2], tasks)]
    here, pooled = Scorer(model, tok, tests, batch_size=4), Scorer(model, tok, tests, batch_size=4, workers=2)
    try:
        expected = here.score_many(requests)
        assert pooled.score_many(requests) == expected       # floats compared exactly
        assert pooled.passes == here.passes == 3 + 3 + 2 + 3
        assert len({v for r in expected for by in r.values() for v in by["ll"]}) > 20   # the adapters matter
        odd = random_lora({"model.layers.0.self_attn.q_proj": (64, 63)}, 2)
        with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj"):
            pooled.score(odd, tasks)
        with pytest.raises(ValueError, match=r"tasks: no test examples for \['typo_en'\]"):
            here.score(loras[0], ["typo_en"])
        for proc in pooled.pool.procs:
            proc.kill()
        with pytest.raises(RuntimeError, match="scoring-worker-.* exited"):
            pooled.score(random_lora(shapes, 4, seed=9), tasks)
    finally:
        here.close()
        pooled.close()
    with pytest.raises(ValueError, match="workers: must be an int >= 1"):
        Scorer(model, tok, tests, workers=0)


def test_score_cache_keeps_entries_saved_by_another_run(tmp_path):
    """Two runs on one adapter folder (an eval beside a ``d2c``): each save keeps the other's entries."""
    from bench.quality.scoring import Scorer

    def scorer(entries):
        s = object.__new__(Scorer)  # the cache alone: no model needed
        s.cache, s.cache_path, s._unsaved = {}, None, 0
        s.persist(tmp_path / "scores.json")
        s.cache.update(entries)
        s._unsaved = len(entries)
        return s

    first = scorer({("a1", "t1"): {"exact": [1.0]}})
    second = scorer({("a2", "t1"): {"exact": [0.0]}})   # loaded before the first one saved
    first.save()
    second.save()
    on_disk = json.loads((tmp_path / "scores.json").read_text())
    assert on_disk == {"a1|t1": {"exact": [1.0]}, "a2|t1": {"exact": [0.0]}}
    assert ("a1", "t1") in second.cache and not list(tmp_path.glob("*.tmp"))


def test_device_is_part_of_the_adapter_key_and_cuda_needs_a_device():
    """Adapters trained on a GPU are other adapters (cached apart); the CPU's key has no device field, so the
    caches made before the option keep their folders. Asking for CUDA where torch has none stops at once."""
    import torch

    from bench.quality.__main__ import main
    from bench.quality.pipeline import Config

    assert Config(device="cpu").key() == Config().key() != Config(device="cuda").key()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: this torch sees no CUDA device"):
            main(["train", "--device", "cuda"])


def _config(*argv):
    """The Config that ``python -m bench.quality eval ARGV`` would run (nothing runs)."""
    from bench.quality.__main__ import build_config, parser

    return build_config(parser().parse_args(["eval", *argv]))


def test_workers_option():
    """``--workers`` reaches the config (default 1: scoring in the main process, as quality.json was scored);
    a count below 1 stops at once, and so does asking a GPU run for CPU workers."""
    assert _config().workers == 1 and _config("--workers", "3").workers == 3
    with pytest.raises(SystemExit, match="--workers: must be >= 1, got 0"):
        _config("--workers", "0")
    with pytest.raises(SystemExit, match="--workers: scoring workers are for the CPU" if torch.cuda.is_available()
                       else "--device cuda: this torch sees no CUDA device"):
        _config("--workers", "2", "--device", "cuda")


def test_default_rows_cover_every_strategy_and_the_published_and_default_modes():
    """The default configuration runs every OnlineMerger strategy, K-Merge in the published mode, in exact
    mode and in the default mode and its two constituents, task arithmetic and the unbounded average, and
    each routing variant in the published (faithful) and the default mode, 17 rows in all (the run-time
    budget); the other rows run on request only, and asking for them is no reduction. --tiny runs every
    row."""
    from bench.quality.evaluate import DEFAULT_ROWS, EXTRA_ROWS, GROUPED, ONLINE, STRATEGIES
    from kmerge_fast.online import DEFAULT_MODE, STRATEGIES as MERGER_STRATEGIES

    cfg = _config()
    assert cfg.strategies == list(DEFAULT_ROWS) and cfg.reductions == []
    assert {ONLINE[r]["strategy"] for r in DEFAULT_ROWS if r in ONLINE} == set(MERGER_STRATEGIES)
    # the default's constituent modes (isoswitch: isonorm for a few tasks, isogeo beyond) are in, iso is not
    assert {"kmerge", "kmerge-exact", "kmerge-isonorm", "kmerge-isogeo", f"kmerge-{DEFAULT_MODE}",
            *GROUPED} <= set(DEFAULT_ROWS)
    assert len(DEFAULT_ROWS) == 17 and "kmerge-iso" in EXTRA_ROWS
    for router in ("kmerge++", "oracle"):
        assert {router, f"{router}-{DEFAULT_MODE}"} <= set(DEFAULT_ROWS)
    assert EXTRA_ROWS and not set(EXTRA_ROWS) & set(DEFAULT_ROWS)
    assert set(DEFAULT_ROWS) | set(EXTRA_ROWS) == set(STRATEGIES)
    assert _config("--strategies", ",".join(STRATEGIES)).reductions == []
    fewer = _config("--strategies", "kmerge,ties")
    assert len(fewer.reductions) == 1 and "'opcm'" in fewer.reductions[0] and "not run" in fewer.reductions[0]
    assert _config("--tiny").strategies == list(STRATEGIES)


def _switch_arm():
    """A synthetic arm: K = 2 on 2 random orders + the adversarial one, its runs listed in the sequence
    they ran (orders 0, 2, 1: evaluate.run_schedule); slots of 1 and 3 tasks; isogeo scores 0.2 higher
    than isonorm on the 3-task slot's tasks, 0.1 lower on the singleton."""
    tasks = ["a", "b", "c", "d"]
    members = [[["a"], ["b", "c", "d"]], [["b"], ["a", "c", "d"]], [["c"], ["a", "b", "d"]]]
    norm = [{t: 0.5 for t in tasks} for _ in members]
    geo = [{t: (0.4 if [t] in m else 0.7) for t in tasks} for m in members]
    single = {"a": 1.0, "b": 1.0, "c": 0.5, "d": 0.0}    # d: no single adapter solves it, left out of S
    return {"tasks": tasks, "orders": [tasks] * 3, "n_random_orders": 2, "single": single,
            "members": {"kmerge-isonorm": {"2": members}, "kmerge-isogeo": {"2": members}},
            "task_exact": {"kmerge-isonorm": {"2": norm}, "kmerge-isogeo": {"2": geo}}}


def test_switch_point_replay_picks_each_slots_rows_scores():
    from bench.quality.switch_point import margins, per_slot, replay

    arm = _switch_arm()
    # runs 0 and 2 are the random orders (run 1 is the adversarial one, not in S). Ratios to the single
    # adapter, isonorm: a 0.5, b 0.5, c 1.0 in every run; isogeo: 0.7 in the 3-task slot (c: 1.4), 0.4 as
    # a singleton (c: 0.8)
    assert replay(arm, 10**9)["2"] == pytest.approx(2.0 / 3)                            # isonorm everywhere
    assert replay(arm, 0)["2"] == pytest.approx((2.5 / 3 + 2.2 / 3) / 2)                 # isogeo everywhere
    assert replay(arm, 1)["2"] == pytest.approx((2.6 / 3 + 2.4 / 3) / 2)                 # singletons isonorm
    assert margins(arm, 1)["2"] == pytest.approx(0.15 / 3) and margins(arm, 3)["2"] == pytest.approx(-0.35 / 3)
    # runs recorded with their order indices: here runs 0 and 1 are the random ones
    arm["run_orders"] = {"kmerge-isonorm": {"2": [0, 1, 2]}}
    assert replay(arm, 0)["2"] == pytest.approx(2.5 / 3) and replay(arm, 1)["2"] == pytest.approx(2.6 / 3)
    table = per_slot(arm)             # every run, the adversarial one included; d (single 0) left out
    assert table[1] == (pytest.approx((-0.1 - 0.1 - 0.2) / 3), 3)           # singletons a, b, c
    assert table[3] == (pytest.approx((0.2 + 0.4 + 0.2 + 0.4 + 0.2 + 0.2) / 6), 3)


def test_switch_point_refuses_runs_whose_slots_differ():
    from bench.quality.switch_point import per_slot

    arm = _switch_arm()
    arm["members"]["kmerge-isogeo"] = {"2": [[["a", "b"], ["c", "d"]]] * 3}
    with pytest.raises(ValueError, match="slots differ"):
        per_slot(arm)


def test_switch_point_replay_matches_the_committed_isoswitch_row():
    """Where every slot holds at most 10 tasks, the committed quality.json's isoswitch row is isonorm's bit
    for bit, so the replay equals it exactly; elsewhere its slots' last bits differ (bfloat16 near-ties),
    within 0.01."""
    from bench.quality.switch_point import arms, random_runs, replay
    from kmerge_fast.strategies import ISONORM_UP_TO

    arm = arms(Path(__file__).resolve().parents[1] / "bench" / "results")["independent"]
    replayed = replay(arm, ISONORM_UP_TO)
    for k, runs in arm["members"]["kmerge-isoswitch"].items():
        real = arm["summary"]["cells"]["kmerge-isoswitch"][k]["s"][0]
        largest = max(len(slot) for pos in random_runs(arm, "kmerge-isoswitch", k) for slot in runs[pos])
        assert replayed[k] == pytest.approx(real, abs=1e-12 if largest <= ISONORM_UP_TO else 0.01)


def test_score_cache_is_per_cpu_thread_count(tmp_path):
    """CPU scores depend on torch's thread count per pass, so a run at another count than the default keeps its
    own score cache instead of reusing (and mixing in) the default's; a run with scoring workers (one thread
    each) shares the one-thread file; GPU scores share the default file."""
    from bench.quality.pipeline import DEFAULT_THREADS, Config, score_cache

    cpu, cuda, pooled = Config(), Config(device="cuda"), Config(workers=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(DEFAULT_THREADS)
        assert score_cache(tmp_path, cpu) == tmp_path / "scores.json"
        assert score_cache(tmp_path, pooled) == tmp_path / "scores-1threads.json"   # one thread per worker
        torch.set_num_threads(1)
        assert score_cache(tmp_path, cpu) == tmp_path / "scores-1threads.json"
        assert score_cache(tmp_path, cuda) == tmp_path / "scores.json"
    finally:
        torch.set_num_threads(before)
