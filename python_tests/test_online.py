"""OnlineMerger: the published K-Merge loop (re-implemented here on peft itself), strategies, errors."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

import kmerge_fast as kf
from conftest import FAMILY_SHAPES as SHAPES, family_adapters, random_lora, spy_inner_products, tiny_llama


# ------------------------------------------------- the published loop on peft
def _published_kmerge(model, tasks: list[str], budget: int, threshold: float | None):
    """K-Merge(++) as the paper's code does it: dense cosine per module, peft 'linear' merges.

    ``model`` is a PeftModel holding every task's adapter under its task name.
    Returns (slot per task, slot adapter names, members).
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]

    def similarity(x: str, y: str) -> float:
        sims = [float(F.cosine_similarity(layer.get_delta_weight(x).flatten(), layer.get_delta_weight(y).flatten(),
                                          dim=0))
                for layer in layers if x in layer.lora_A and y in layer.lora_A]
        return sum(sims) / len(sims)

    slots, members, choices = [], [], []
    for step, task in enumerate(tasks):
        sims = [similarity(task, s) for s in slots]
        opens = len(slots) < budget and (threshold is None or not sims or max(sims) < threshold)
        if opens:
            slots.append(task)
            members.append([task])
            choices.append(len(slots) - 1)
            continue
        best = max(range(len(sims)), key=lambda i: sims[i])
        n = len(members[best]) + 1
        merged = f"merged_{step}"
        model.add_weighted_adapter([slots[best], task], [1 - 1 / n, 1 / n], merged, combination_type="linear")
        slots[best] = merged
        members[best].append(task)
        choices.append(best)
    return choices, slots, members


def _peft_factors(model, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for key, m in model.named_modules():
        if isinstance(m, LoraLayer) and adapter in m.lora_A:
            out[kf.lora.canonical_name(key)] = (m.lora_A[adapter].weight.detach(), m.lora_B[adapter].weight.detach(),
                                                m.scaling[adapter])
    return out


@pytest.mark.parametrize("strategy,budget", [("kmerge", 3), ("kmerge", 1), ("kmerge++", 4)])
def test_faithful_mode_matches_published_loop(tmp_path, strategy, budget):
    peft = pytest.importorskip("peft")
    adapters = family_adapters(9)
    tasks = [f"task{k}" for k in range(len(adapters))]
    for task, lora in zip(tasks, adapters):
        lora.save(tmp_path / task)
    base = tiny_llama(hidden=32, layers=2)
    model = peft.PeftModel.from_pretrained(base, tmp_path / tasks[0], adapter_name=tasks[0])
    for task in tasks[1:]:
        model.load_adapter(tmp_path / task, adapter_name=task)
    threshold = kf.calibrate_threshold(family_adapters(6, seed=99)) if strategy == "kmerge++" else None

    choices, slot_names, members = _published_kmerge(model, tasks, budget, threshold)
    merger = kf.OnlineMerger(budget, strategy=strategy, threshold=threshold, mode="faithful")
    ours = [merger.add(kf.LoRA.load(tmp_path / t), t) for t in tasks]
    assert ours == choices
    assert merger.members == members
    assert len(set(choices)) > 1 or budget == 1
    for slot, name in zip(merger.slots, slot_names):
        theirs = _peft_factors(model, name)
        assert set(theirs) == set(slot.modules)
        for key, (a, b, s) in theirs.items():
            m = slot.modules[key]
            assert m.scaling == pytest.approx(s)
            torch.testing.assert_close(m.A, a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m.B, b, rtol=1e-5, atol=1e-6)


def _true_average(adapters, tasks, members_of_slot):
    """The running average of the dense updates of a slot's tasks, per module (float64)."""
    index = {t: i for i, t in enumerate(tasks)}
    out = {}
    for name in adapters[0].modules:
        out[name] = sum(adapters[index[t]].modules[name].delta(torch.float64) for t in members_of_slot)
        out[name] = out[name] / len(members_of_slot)
    return out


def test_exact_mode_tracks_the_true_average_better_than_faithful():
    adapters = family_adapters(12, families=3, rank=4)
    tasks = [f"t{k}" for k in range(12)]
    errors = {}
    for mode in ("faithful", "exact"):
        merger = kf.OnlineMerger(3, mode=mode)
        for t, lora in zip(tasks, adapters):
            merger.add(lora, t)
        err, norm = 0.0, 0.0
        for slot, members in zip(merger.slots, merger.members):
            truth = _true_average(adapters, tasks, members)
            for name, m in slot.modules.items():
                err += float((m.delta(torch.float64) - truth[name]).square().sum())
                norm += float(truth[name].square().sum())
        errors[mode] = (err / norm) ** 0.5
    # exact keeps the best rank-r approximation of a rank-<=n*r average; faithful's
    # factor-wise sum adds cross terms and is much further off
    assert errors["exact"] < 0.8 * errors["faithful"], errors
    assert errors["exact"] < 0.6, errors


def test_exact_mode_is_exact_while_rank_allows():
    a, b = family_adapters(2, families=1, rank=2)
    merger = kf.OnlineMerger(1, mode="exact")
    merger.add(a, "a")
    merger.add(b, "b")
    for name, m in merger.slots[0].modules.items():
        truth = (a.modules[name].delta(torch.float64) + b.modules[name].delta(torch.float64)) / 2
        # the rank-2 slot holds the best rank-2 approximation of a rank-4 average
        s = torch.linalg.svdvals(truth)
        best = float(s[2:].square().sum().sqrt())
        assert float((m.delta(torch.float64) - truth).norm()) <= best * (1 + 1e-4) + 1e-9


@pytest.mark.parametrize("mode,power", [("exact", 1.0), ("rms", 0.5), ("sum", 0.0)])
def test_scaled_modes_hold_the_scaled_sum_while_rank_allows(mode, power):
    """Rank-1 members into a rank-3 slot: no truncation, so the slot is exactly n^-power * sum dW (float64 truth)."""
    adapters = family_adapters(3, families=3, rank=1, dtype=torch.float64)
    wide = [kf.LoRA.from_factors({n: (torch.cat([m.A, torch.zeros(2, m.A.shape[1], dtype=m.A.dtype)]),
                                      torch.cat([m.B, torch.zeros(m.B.shape[0], 2, dtype=m.B.dtype)], 1))
                                  for n, m in lo.modules.items()}, scaling={n: m.scaling for n, m in lo.modules.items()})
            for lo in adapters[:1]] + adapters[1:]
    merger = kf.OnlineMerger(1, mode=mode)
    for k, lora in enumerate(wide):
        merger.add(lora, f"t{k}")
    for name, m in merger.slots[0].modules.items():
        truth = sum(a.modules[name].delta(torch.float64) for a in adapters) * 3 ** -power
        torch.testing.assert_close(m.delta(torch.float64), truth, rtol=1e-9, atol=1e-9)
        assert m.rank == 3


@pytest.mark.parametrize("mode", ["rms", "sum"])
def test_scaled_modes_keep_the_best_rank_r_approximation(mode):
    """Each step is the best rank-r approximation of w_slot * slot + w_new * dW_new (Eckart-Young bound)."""
    a, b = family_adapters(2, families=2, rank=2)
    merger = kf.OnlineMerger(1, mode=mode)
    merger.add(a, "a")
    merger.add(b, "b")
    w = kf.online.running_weights(mode, 2)
    for name, m in merger.slots[0].modules.items():
        truth = w[0] * a.modules[name].delta(torch.float64) + w[1] * b.modules[name].delta(torch.float64)
        best = float(torch.linalg.svdvals(truth)[2:].square().sum().sqrt())
        assert float((m.delta(torch.float64) - truth).norm()) <= best * (1 + 1e-4) + 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_iso_mode_serves_exact_mode_with_a_flat_spectrum(dtype):
    """Every iso slot is exact mode's slot (same stream, same slots) with all singular values set to their
    root mean square: float64 SVD truth of each served dW."""
    adapters = family_adapters(9, families=3, rank=3, dtype=dtype)
    # the by-type router sends every newcomer to its family's slot, whatever the slots hold
    kw = dict(strategy="oracle", oracle=lambda task: int(task[1:]) % 3)
    iso, exact = kf.OnlineMerger(3, mode="iso", **kw), kf.OnlineMerger(3, mode="exact", **kw)
    for k, lora in enumerate(adapters):
        iso.add(lora, f"t{k}"), exact.add(lora, f"t{k}")
    assert iso.members == exact.members
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for served, ref in zip(iso.slots, exact.slots):
        for name, m in served.modules.items():
            s_ref = torch.linalg.svdvals(ref.modules[name].delta(torch.float64))[:m.rank]
            s = torch.linalg.svdvals(m.delta(torch.float64))
            flat = s_ref.square().mean().sqrt()
            torch.testing.assert_close(s[:m.rank], flat.expand(m.rank), rtol=tol, atol=0)
            assert float(s[m.rank:].abs().sum()) <= tol * float(flat) * m.rank
            # the same subspaces: dW_iso = flat * U V^T of exact's dW
            U, _, Vh = torch.linalg.svd(ref.modules[name].delta(torch.float64), full_matrices=False)
            want = flat * U[:, :m.rank] @ Vh[:m.rank]
            assert float((m.delta(torch.float64) - want).norm() / want.norm()) < 5 * tol
            assert m.A.dtype == dtype and m.B.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", ["isonorm", "isogeo", "isoswitch"])
def test_rescaled_iso_modes_serve_iso_at_their_norm(mode, dtype):
    """Every isonorm / isogeo / isoswitch slot is iso's slot (same stream, same slots, same flat subspaces)
    rescaled per module to N = mean_i ||dW_i||_F (isonorm; isoswitch, whose slots of 3 tasks are below its
    switch) or sqrt(||dW_iso||_F * mean_i ||dW_i||_F) (isogeo): float64 dense truth of the members and of
    each served dW."""
    adapters = family_adapters(9, families=3, rank=3, dtype=dtype)
    kw = dict(strategy="oracle", oracle=lambda task: int(task[1:]) % 3)
    scaled, iso = kf.OnlineMerger(3, mode=mode, **kw), kf.OnlineMerger(3, mode="iso", **kw)
    for k, lora in enumerate(adapters):
        scaled.add(lora, f"t{k}"), iso.add(lora, f"t{k}")
    assert scaled.members == iso.members and all(len(m) == 3 for m in scaled.members)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for served, ref, tasks in zip(scaled.slots, iso.slots, scaled.members):
        for name, m in served.modules.items():
            members = [adapters[int(t[1:])].modules[name].delta(torch.float64) for t in tasks]
            mean_norm = sum(float(d.norm()) for d in members) / len(members)
            d_iso = ref.modules[name].delta(torch.float64)
            # the members disagree, so the average (and iso) is smaller than a member: the rescaling matters
            assert float(d_iso.norm()) < 0.9 * mean_norm
            want_norm = (float(d_iso.norm()) * mean_norm) ** 0.5 if mode == "isogeo" else mean_norm
            assert float(m.delta(torch.float64).norm()) == pytest.approx(want_norm, rel=tol)
            want = d_iso * (want_norm / float(d_iso.norm()))
            assert float((m.delta(torch.float64) - want).norm() / want.norm()) < 5 * tol
            assert m.A.dtype == dtype and m.B.dtype == dtype


@pytest.mark.parametrize("mode", ["iso", "isonorm", "isogeo", "isoswitch"])
def test_same_adapter_merged_into_itself_is_served_unchanged(mode):
    """Members that agree: the slot of n copies of one adapter serves that adapter's update (float64 truth)."""
    (a,) = family_adapters(1, families=1, rank=3, dtype=torch.float64)
    merger = kf.OnlineMerger(1, mode=mode)
    for k in range(4):
        merger.add(a, f"t{k}")
    for name, m in merger.slots[0].modules.items():
        truth = a.modules[name].delta(torch.float64)
        U, s, Vh = torch.linalg.svd(truth, full_matrices=False)
        # the spectrum is flattened, so the norm and the subspace are what is kept; the rescaled modes take
        # the members' norms from float32 Grams (similarity's cache): 1e-6
        assert float(m.delta(torch.float64).norm()) == pytest.approx(float(truth.norm()), rel=1e-6)
        want = float(s[:3].square().mean().sqrt()) * U[:, :3] @ Vh[:3]
        assert float((m.delta(torch.float64) - want).norm() / want.norm()) < 1e-6


@pytest.mark.parametrize("mode", ["iso", "isonorm", "isogeo", "isoswitch"])
def test_iso_state_round_trips_and_resumes_bit_exactly(tmp_path, mode):
    """The spectrum kept in the manifest lets a reopened store continue exactly as the merger in memory."""
    adapters = family_adapters(8, families=2, rank=3)
    memory = kf.OnlineMerger(2, mode=mode)
    with kf.OnlineMerger(2, mode=mode, store=tmp_path / "s") as stored:
        for k, lora in enumerate(adapters[:5]):
            memory.add(lora, f"t{k}"), stored.add(lora, f"t{k}")
    with kf.OnlineMerger.open(tmp_path / "s") as stored:
        assert stored.mode == mode
        for k, lora in enumerate(adapters[5:], 5):
            memory.add(lora, f"t{k}"), stored.add(lora, f"t{k}")
        assert stored.members == memory.members
        for a, b in zip(stored.slots, memory.slots):
            for name in a.modules:
                assert torch.equal(a.modules[name].A, b.modules[name].A)
                assert torch.equal(a.modules[name].B, b.modules[name].B)


def test_isoswitch_is_isonorm_up_to_ten_tasks_then_isogeo():
    """One slot, thirteen independent adapters: isoswitch serves it bit for bit as isonorm while it holds at
    most ISONORM_UP_TO (10) tasks, and as isogeo from the eleventh (float64; the switch matters: isonorm's
    norm is larger)."""
    from kmerge_fast.strategies import ISONORM_UP_TO

    assert ISONORM_UP_TO == 10
    adapters = family_adapters(13, families=13, rank=3, dtype=torch.float64)
    mergers = {mode: kf.OnlineMerger(1, mode=mode) for mode in ("isoswitch", "isonorm", "isogeo")}
    for k, lora in enumerate(adapters):
        for merger in mergers.values():
            merger.add(lora, f"t{k}")
        switch, norm, geo = (mergers[mode].slots[0].modules for mode in ("isoswitch", "isonorm", "isogeo"))
        for name, m in switch.items():
            if k + 1 <= ISONORM_UP_TO:
                assert torch.equal(m.A, norm[name].A) and torch.equal(m.B, norm[name].B)
                continue
            served, want = m.delta(torch.float64), geo[name].delta(torch.float64)
            assert float((served - want).norm() / want.norm()) < 1e-9
            assert float(norm[name].delta(torch.float64).norm()) > 1.2 * float(served.norm())


def test_a_store_goes_on_with_the_switch_point_it_recorded(tmp_path, monkeypatch):
    """An isoswitch store records its switch point (settings.isonorm_up_to) and serves by it when resumed,
    whatever the running kmerge_fast's constant: a store created under a switch at 2 serves its fourth task
    at isogeo's norm after the constant is back at 10, bit for bit as a merger that ran under 2 throughout
    (under 10 the fourth task is served at isonorm's, another norm for these adapters). An isoswitch store
    without the field (written before stores recorded it) follows the constant; other modes record none."""
    from kmerge_fast import online, strategies
    from kmerge_fast.store import manifest_checksum

    adapters = family_adapters(4, families=4, rank=3, dtype=torch.float64)

    def slot(merger):
        return {name: (m.A, m.B) for name, m in merger.slots[0].modules.items()}

    def same(a, b):
        return all(torch.equal(x, y) for name in a for x, y in zip(a[name], b[name]))

    def add(merger, ks):
        for k in ks:
            merger.add(adapters[k], f"t{k}")
        return merger

    monkeypatch.setattr(online, "ISONORM_UP_TO", 2)
    two = add(kf.OnlineMerger(1, mode="isoswitch"), range(4))
    with kf.OnlineMerger(1, mode="isoswitch", store=tmp_path / "s") as stored:
        add(stored, range(3))
    monkeypatch.setattr(online, "ISONORM_UP_TO", 10)
    ten = add(kf.OnlineMerger(1, mode="isoswitch"), range(4))
    assert ten.settings["isonorm_up_to"] == 10 and "isonorm_up_to" not in kf.OnlineMerger(1, mode="isonorm").settings
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["settings"]["isonorm_up_to"] == 2
    del manifest["settings"]["isonorm_up_to"]  # the store as one written before stores recorded it
    manifest["checksum"] = manifest_checksum(manifest)
    for name in ("old2", "old10"):
        shutil.copytree(tmp_path / "s", tmp_path / name)
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    with kf.OnlineMerger.open(tmp_path / "s") as stored:
        resumed = slot(add(stored, [3]))
    assert same(resumed, slot(two)) and not same(resumed, slot(ten))
    with kf.OnlineMerger.open(tmp_path / "old10") as old:
        assert not same(slot(add(old, [3])), slot(two))
    monkeypatch.setattr(strategies, "ISONORM_UP_TO", 2)
    with kf.OnlineMerger.open(tmp_path / "old2") as old:
        assert same(slot(add(old, [3])), slot(two))
    assert "isonorm_up_to" not in json.loads((tmp_path / "old2" / "manifest.json").read_text())["settings"]


def test_served_norm_does_not_change_cosine_routing():
    """iso, isonorm, isogeo and isoswitch serve one flat average at different per-module norms; routing by
    the default metric (mean of per-module cosines) does not see those norms, so a stream fills the same
    slots in all four modes (the quality benchmark compares the modes slot by slot on that). The l2
    distance does see them: there isonorm and isogeo route this stream differently."""
    adapters = family_adapters(14, families=7, rank=3)

    def members(mode, similarity):
        merger = kf.OnlineMerger(3, mode=mode, similarity=similarity)
        for k, lora in enumerate(adapters):
            merger.add(lora, f"t{k}")
        return merger.members

    cos = {mode: members(mode, "cos") for mode in ("iso", "isonorm", "isogeo", "isoswitch")}
    assert all(m == cos["iso"] for m in cos.values()) and max(len(m) for m in cos["iso"]) > 2
    assert members("isonorm", "l2") != members("isogeo", "l2")


def test_isotropic_and_anisotropic_are_inverse():
    from kmerge_fast.strategies import anisotropic, isotropic

    a, b = family_adapters(2, families=2, rank=4, dtype=torch.float64)
    merged = kf.merge([a, b], [0.5, 0.5], method="svd", rank=4)
    flat, spectrum = isotropic(merged)
    for name, m in flat.modules.items():
        norms = m.B.norm(dim=0)
        torch.testing.assert_close(norms, norms.mean().expand_as(norms), rtol=1e-12, atol=0)
        assert float(m.delta().norm()) == pytest.approx(float(merged.modules[name].delta().norm()), rel=1e-12)
    back = anisotropic(flat, spectrum)
    for name, m in back.modules.items():
        torch.testing.assert_close(m.B, merged.modules[name].B, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="spectrum: module .* holds 3 values for rank 4"):
        anisotropic(flat, {n: v[:3] for n, v in spectrum.items()})
    with pytest.raises(ValueError, match="spectrum: holds modules"):
        anisotropic(flat, dict(list(spectrum.items())[:1]))


def test_running_weights_give_the_scaled_sum():
    """Composing the per-step weights from n = 2 to 6 gives c_n = n^-1, n^-1/2, 1 on every member."""
    for mode, power in (("exact", 1.0), ("faithful", 1.0), ("rms", 0.5), ("sum", 0.0)):
        coeffs = [1.0]
        for n in range(2, 7):
            w_slot, w_new = kf.online.running_weights(mode, n)
            coeffs = [c * w_slot for c in coeffs] + [w_new]
            assert coeffs == pytest.approx([n ** -power] * n), (mode, n)


def test_default_mode_is_documented_and_used():
    merger = kf.OnlineMerger(2)
    assert merger.mode == kf.online.DEFAULT_MODE
    assert kf.OnlineMerger(2, strategy="ties").mode == "faithful"   # the peft baselines have no modes


def test_kmerge_plus_plus_auto_threshold_is_the_width_rule():
    """threshold='auto' (the default) = mean over modules of r / n_in of the newcomer; decides like a number."""
    adapters = family_adapters(6)
    rule = kf.online.width_threshold(adapters[0])
    assert rule == pytest.approx(sum(4 / 32 for _ in SHAPES) / len(SHAPES))
    auto = kf.OnlineMerger(4, strategy="kmerge++")
    fixed = kf.OnlineMerger(4, strategy="kmerge++", threshold=rule)
    for k, lora in enumerate(adapters):
        assert auto.add(lora, f"t{k}") == fixed.add(lora, f"t{k}")
    assert auto.threshold == "auto" and auto.members == fixed.members


def test_kmerge_plus_plus_auto_threshold_persists(tmp_path):
    adapters = family_adapters(4)
    with kf.OnlineMerger(3, strategy="kmerge++", store=tmp_path / "s") as merger:
        merger.add(adapters[0], "t0")
    with kf.OnlineMerger.open(tmp_path / "s") as merger:
        assert merger.threshold == "auto"
        merger.add(adapters[1], "t1")


def test_faithful_mode_warns_when_a_is_shared():
    """Adapters trained from one A initialisation: faithful mode approaches a sum, and says so."""
    g = torch.Generator().manual_seed(0)
    a0 = {n: torch.randn(4, shape[1], generator=g) for n, shape in SHAPES.items()}
    shared = [kf.LoRA.from_factors({n: (a0[n] + 0.05 * torch.randn(a0[n].shape, generator=g),
                                        torch.randn(shape[0], 4, generator=g)) for n, shape in SHAPES.items()})
              for _ in range(3)]
    assert kf.online.a_alignment(shared[0], shared[1]) > 0.9
    merger = kf.OnlineMerger(1, mode="faithful")
    merger.add(shared[0], "a")
    with pytest.warns(UserWarning, match="aligned") as caught:
        merger.add(shared[1], "b")
        merger.add(shared[2], "c")
    assert len([w for w in caught if "aligned" in str(w.message)]) == 1     # once per merger
    independent = family_adapters(2, families=2)
    assert kf.online.a_alignment(independent[0], independent[1]) < 0.3
    for mode in ("faithful", "rms"):    # independent A (faithful) or another mode: no warning
        merger = kf.OnlineMerger(1, mode=mode)
        merger.add((independent if mode == "faithful" else shared)[0], "a")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            merger.add((independent if mode == "faithful" else shared)[1], "b")


@pytest.mark.parametrize("strategy", ["linear", "ties", "dare_linear", "dare_ties", "random", "opcm"])
def test_baselines_run_and_route(strategy):
    adapters = family_adapters(8)
    merger = kf.OnlineMerger(3, strategy=strategy, seed=3)
    slots = [merger.add(lora, f"t{k}") for k, lora in enumerate(adapters)]
    assert slots[:3] == [0, 1, 2] and len(merger.slots) == 3
    assert sorted(t for m in merger.members for t in m) == sorted(f"t{k}" for k in range(8))
    for k in range(8):
        assert merger.slot_for(f"t{k}") == slots[k]
    for slot in merger.slots:
        for m in slot.modules.values():
            assert torch.isfinite(m.A).all() and torch.isfinite(m.B).all() and m.rank == 4
    if strategy != "random":  # similarity routing puts families together
        assert merger.members[0] == ["t0", "t3", "t6"]


def test_random_strategy_is_seeded():
    adapters = family_adapters(10)
    runs = []
    for seed in (5, 5, 6):
        merger = kf.OnlineMerger(2, strategy="random", seed=seed)
        runs.append([merger.add(lora, f"t{k}") for k, lora in enumerate(adapters)])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_oracle_strategy_is_the_published_by_type_rule():
    """Free slots first in arrival order; then the first slot whose FIRST member has the newcomer's type,
    else the most similar slot (the published baseline; a type may hold several slots)."""
    adapters = family_adapters(7)
    merger = kf.OnlineMerger(4, strategy="oracle", oracle=lambda task: task.split("_")[0])
    names = ["qa_en", "sum_en", "qa_de", "sum_de", "ner_en", "qa_fr", "ner_de"]
    for name, lora in zip(names, adapters):
        merger.add(lora, name)
    steps = {h.task: h for h in merger.history}
    assert [steps[n].slot for n in names[:4]] == [0, 1, 2, 3]          # two qa slots: free slots come first
    assert steps["qa_fr"].slot == 0                                     # the first slot whose first member is qa
    for ner in ("ner_en", "ner_de"):                                    # no ner slot: the most similar one
        sims = steps[ner].similarities
        assert steps[ner].slot == max(range(4), key=lambda i: (sims[i], -i))
    assert sorted(t for m in merger.members for t in m) == sorted(names)


def test_opcm_projects_out_the_shared_subspace():
    """A rank-1 newcomer inside the slot's leading subspace projects to zero: the slot is unchanged."""
    a = family_adapters(1, rank=1)[0]
    merger = kf.OnlineMerger(1, strategy="opcm")
    merger.add(a, "a")
    merger.add(a, "a_again")
    for name, m in merger.slots[0].modules.items():
        torch.testing.assert_close(m.delta(torch.float64), a.modules[name].delta(torch.float64), rtol=1e-5, atol=1e-6)


def test_opcm_keeps_the_mean_task_norm():
    """lambda_t rescales the merged update to the mean norm of the task vectors (before truncation)."""
    adapters = family_adapters(2, families=2, rank=4)
    merger = kf.OnlineMerger(1, strategy="opcm")
    merger.add(adapters[0], "a")
    merger.add(adapters[1], "b")
    for name, m in merger.slots[0].modules.items():
        mean = sum(float(x.modules[name].delta(torch.float64).norm()) for x in adapters) / 2
        got = float(m.delta(torch.float64).norm())
        assert 0.7 * mean <= got <= mean * (1 + 1e-6)  # truncation to rank 4 only removes energy


def test_similarity_uses_cached_slot_norms(monkeypatch):
    adapters = family_adapters(6)
    merger = kf.OnlineMerger(2)
    for k, lora in enumerate(adapters[:4]):
        merger.add(lora, f"t{k}")
    merger._similarities(adapters[5])  # the last merged slot's norms get computed (and cached) here
    calls = spy_inner_products(monkeypatch)
    merger._similarities(adapters[4])
    # one backend call: per module the newcomer vs the 2 slots, then the self-pairs of the
    # newcomer's modules only (the slots' norms are cached)
    assert len(calls) == 1
    batch = calls[0]
    assert [(len(xs), len(ys)) for xs, ys in batch] == [(1, 2)] * len(SHAPES) + [(1, 1)] * len(SHAPES)
    newcomer = {id(m.A) for m in adapters[4].modules.values()}
    assert all(xs is ys and id(xs[0].A) in newcomer for xs, ys in batch[len(SHAPES):])


def test_history_records_each_step():
    adapters = family_adapters(4)
    merger = kf.OnlineMerger(2)
    for k, lora in enumerate(adapters):
        merger.add(lora, f"t{k}")
    h = merger.history
    assert [s.task for s in h] == ["t0", "t1", "t2", "t3"]
    assert [s.action for s in h] == ["new", "new", "merge", "merge"]
    assert h[0].similarities == [] and len(h[1].similarities) == 1 and len(h[2].similarities) == 2
    assert h[2].slot == max(range(2), key=lambda i: h[2].similarities[i])
    assert all(s.seconds >= 0 for s in h)


def test_calibrate_threshold_is_median_pairwise():
    adapters = family_adapters(5)
    sims = kf.similarity_matrix(adapters)
    values = sorted(float(sims[i, j]) for i in range(5) for j in range(i + 1, 5))
    assert kf.calibrate_threshold(adapters) == pytest.approx((values[4] + values[5]) / 2)
    with pytest.raises(ValueError, match="at least 2"):
        kf.calibrate_threshold(adapters[:1])


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,message", [
    (dict(budget=0), "budget: must be an int >= 1"),
    (dict(budget=2.5), "budget"),
    (dict(strategy="greedy"), "strategy: unknown"),
    (dict(similarity="dot"), "similarity: unknown"),
    (dict(mode="approx"), "mode: unknown"),
    (dict(strategy="ties", mode="exact"), "mode: 'exact' applies"),
    (dict(strategy="kmerge++", threshold=float("nan")), "threshold: kmerge\\+\\+ needs"),
    (dict(strategy="kmerge++", threshold="median"), "threshold: kmerge\\+\\+ needs"),
    (dict(threshold=0.1), "threshold: only kmerge\\+\\+"),
    (dict(strategy="oracle"), "oracle:"),
    (dict(density=0.0), "density"),
])
def test_bad_settings(kw, message):
    args = dict(budget=2)
    args.update(kw)
    with pytest.raises(ValueError, match=message):
        kf.OnlineMerger(**args)


def test_bad_newcomers_change_nothing():
    adapters = family_adapters(3)
    merger = kf.OnlineMerger(1, mode="faithful")     # the mode that needs equal ranks
    merger.add(adapters[0], "t0")
    before = [{n: (m.A.clone(), m.B.clone()) for n, m in s.modules.items()} for s in merger.slots]

    other_shape = random_lora({"model.layers.0.self_attn.q_proj": (32, 40)}, 4)
    bad_rank = family_adapters(1, rank=3)[0]
    nan = family_adapters(1)[0]
    next(iter(nan.modules.values())).B[0, 0] = float("nan")
    cases = [(other_shape, "t1", "does not match the stored base model"),
             (bad_rank, "t1", "has rank 3, the slots 4"),
             (nan, "t1", "NaN or Inf"),
             (adapters[1], "t0", "already stored"),
             (adapters[1], "", "task: need a non-empty string")]
    for lora, task, message in cases:
        with pytest.raises(ValueError, match=message):
            merger.add(lora, task)
    with pytest.raises(TypeError, match="lora: expected"):
        merger.add("adapter_dir", "t1")
    assert merger.members == [["t0"]] and len(merger.history) == 1
    for slot, saved in zip(merger.slots, before):
        for n, (a, b) in saved.items():
            assert torch.equal(slot.modules[n].A, a) and torch.equal(slot.modules[n].B, b)


def test_replace_a_task_alone_in_its_slot():
    adapters = family_adapters(4, families=2)  # t2 joins t0's slot
    merger = kf.OnlineMerger(2)
    for k in range(3):
        merger.add(adapters[k], f"t{k}")
    assert merger.add(adapters[3], "t1", replace=True) == 1
    assert merger.slots[1] is adapters[3] and merger.members[1] == ["t1"]
    with pytest.raises(ValueError, match="shares slot 0"):
        merger.add(adapters[3], "t0", replace=True)
    with pytest.raises(KeyError, match="never added"):
        merger.slot_for("t9")


def test_a_new_strategy_is_one_class_registered_once(tmp_path):
    """A router subclass, registered once with add_strategy: OnlineMerger takes it by name, pairs it with
    the mode's running average (or a named combiner), and a store persists and reopens it by name."""
    from kmerge_fast import strategies

    class LeastSimilar(strategies.Router):
        name = "test_least_similar"

        def choose(self, task, lora, sims, seed):
            return len(sims) if len(sims) < self.budget else min(range(len(sims)), key=lambda i: (sims[i], i))

    strategies.add_strategy("test_least", LeastSimilar)               # combiner: the mode's running average
    strategies.add_strategy("test_least_ties", "test_least_similar", "ties")
    try:
        adapters = family_adapters(7)
        with kf.OnlineMerger(2, strategy="test_least", mode="rms", store=tmp_path / "s") as merger:
            assert isinstance(merger.router, LeastSimilar) and isinstance(merger.combiner, strategies.Rms)
            for k, lora in enumerate(adapters[:5]):
                merger.add(lora, f"t{k}")
        with kf.OnlineMerger.open(tmp_path / "s") as merger:
            assert merger.settings["strategy"] == "test_least" and merger.mode == "rms"
            merger.add(adapters[5], "t5")
            for step in merger.history[2:]:
                assert step.slot == min(range(2), key=lambda i: (step.similarities[i], i))
        ties = kf.OnlineMerger(2, strategy="test_least_ties", seed=1)
        assert ties.mode == "faithful" and type(ties.combiner) is strategies.Ties
        with pytest.raises(ValueError, match=r"mode: 'exact' applies to the running-average strategies "
                                             r"\[.*'test_least'\], not 'test_least_ties'"):
            kf.OnlineMerger(2, strategy="test_least_ties", mode="exact")
        with pytest.raises(ValueError, match="registered already"):
            strategies.add_strategy("test_least_again", type("Other", (strategies.Router,), {"name": "oracle"}))
    finally:
        for name in ("test_least", "test_least_ties"):
            strategies.STRATEGY_TABLE.pop(name, None)
        strategies.ROUTERS.pop("test_least_similar", None)
    assert kf.online.STRATEGIES == tuple(strategies.STRATEGY_TABLE) == strategies.STRATEGIES
    with pytest.raises(ValueError, match="strategy: unknown 'test_least'"):
        kf.OnlineMerger(2, strategy="test_least")
