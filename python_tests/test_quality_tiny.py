"""The quality benchmark (bench/quality) end to end on a tiny config-built Llama: no downloads, < 3 minutes.

Runs what ``python -m bench.quality all --tiny`` runs: tiny base pre-trained from scratch, 2 task types x
2 languages, one LoRA each (same seed), every OnlineMerger strategy at K = 1..3 over 3 arrival orders,
D2C vs K-Means vs random; the outputs go to a temporary folder, never bench/results.
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

    saved = json.loads((tmp_path / "quality.json").read_text())
    for key in ("model", "tasks", "n_adapters", "orders", "single", "s_score", "d2c"):
        assert key in saved, key
    assert saved["n_adapters"] == 4 and len(saved["orders"]) == 3
    assert set(saved["s_score"]) == set(STRATEGIES)
    assert all(set(row) == {"1", "2", "3"} for row in saved["s_score"].values())
    assert {"budget", "d2c", "kmeans", "random"} <= set(saved["d2c"])
    assert "| kmerge |" in (tmp_path / "quality.md").read_text()
    assert all(n == 3 for row in saved["orders_done"].values() for n in row.values())
    assert saved["machine"]["cores"] >= 1 and "Machine:" in (tmp_path / "quality.md").read_text()
    # `report` re-renders the markdown from the JSON alone
    (tmp_path / "quality.md").unlink()
    from bench.quality.__main__ import main
    main(["report", "--out", str(tmp_path)])
    assert "| kmerge |" in (tmp_path / "quality.md").read_text()
    # the adapters are cached with a manifest under the output folder
    manifests = list((tmp_path / "adapters").glob("*/manifest.json"))
    assert len(manifests) == 1 and len(json.loads(manifests[0].read_text())["adapters"]) == 4
    # merging beats the zero-shot base on average (also asserted by run_tiny)
    base = sum(results["base"].values()) / len(results["base"])
    merged = [v for row in results["score"].values() for v in row.values()]
    assert sum(merged) / len(merged) > base
    # nothing written to bench/results
    assert {p: p.stat().st_mtime for p in RESULTS.glob("quality.*")} == before


def test_deadline_keeps_every_cell_on_the_first_order(monkeypatch):
    """Orders outermost: a run cut short has each (strategy, K) on order 0 before any gets order 1."""
    from conftest import random_lora

    from bench.quality import evaluate

    class Scores:  # stands in for the decoding Evaluator: a score per task, no model
        def score(self, lora, tasks):
            return {t: 0.5 for t in tasks}

    adapters = {f"{kind}_{lang}": random_lora({"q": (6, 5)}, 2, seed=i)
                for i, (kind, lang) in enumerate([("date", "en"), ("date", "de"), ("typo", "en"), ("typo", "de")])}
    single = {t: 1.0 for t in adapters}
    orders = evaluate.arrival_orders(list(adapters), 3)
    cells = 2 * 2  # strategies x budgets
    clock = iter(range(10_000))
    # evaluate's own clock only: one tick per deadline check
    monkeypatch.setattr(evaluate, "time", types.SimpleNamespace(time=lambda: next(clock), perf_counter=time.perf_counter))
    out = evaluate.run_online(Scores(), adapters, single, [1, 2], orders, ["kmerge", "linear"],
                              deadline=cells + 1.5, log=lambda *_: None)  # every cell once, then 2 more
    done = [out["orders_done"][label][k] for k in ("1", "2") for label in ("kmerge", "linear")]
    assert sorted(done) == [1, 1, 2, 2] and done[:2] == [2, 2]  # K=1 cells got the second order first
    assert all(out["s_score"][label][k] == pytest.approx(0.5) for label in ("kmerge", "linear") for k in ("1", "2"))
    assert len(out["skipped"]) == 3 * cells - 6 and all("order" in s for s in out["skipped"])
