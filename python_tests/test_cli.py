"""The kmerge-fast command line: demo, stream, inspect, export, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import kmerge_fast as kf
from kmerge_fast.cli import main
from conftest import family_adapters


@pytest.fixture
def adapter_dirs(tmp_path):
    paths = []
    for k, lora in enumerate(family_adapters(5, families=2)):
        path = tmp_path / "adapters" / f"task{k}"
        lora.save(path)
        paths.append(str(path))
    return paths


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--adapters", "4", "--layers", "1", "--hidden", "32",
                 "--rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "mean per-module cosine similarity" in out and "svd merge of 4 adapters" in out
    assert kf.LoRA.load(tmp_path / "demo" / "merged").ranks


def test_stream_inspect_export(tmp_path, adapter_dirs, capsys):
    store = str(tmp_path / "store")
    assert main(["stream", "--store", store, "--budget", "2", "--quiet", *adapter_dirs[:3]]) == 0
    out = capsys.readouterr().out
    assert "task0: new -> slot 0" in out and "task2: merge -> slot 0" in out and " ms" in out
    # resume with the rest
    assert main(["stream", "--store", store, "--quiet", *adapter_dirs[3:]]) == 0
    assert "resuming" in capsys.readouterr().out
    assert main(["inspect", "--store", store]) == 0
    table = capsys.readouterr().out
    assert "task0, task2, task4" in table and "task1, task3" in table
    assert "mode isoswitch (isonorm up to 10 tasks)" in table
    assert main(["export", "--store", store, "--slot", "1", str(tmp_path / "out")]) == 0
    with kf.OnlineMerger.open(store) as m:
        exported = kf.LoRA.load(tmp_path / "out")
        for name, mod in m.slots[1].modules.items():
            assert torch.equal(exported.modules[name].A, mod.A)
        assert m.members == [["task0", "task2", "task4"], ["task1", "task3"]]


@pytest.mark.parametrize("argv,message", [
    (["stream", "--store", "{tmp}/new", "{a0}"], "--budget: required"),
    (["stream", "--store", "{tmp}/new", "--budget", "0", "{a0}"], "budget: must be"),
    (["stream", "--store", "{tmp}/new", "--budget", "2", "--strategy", "kmerge++", "--threshold", "high", "{a0}"],
     "threshold"),
    (["stream", "--store", "{tmp}/new", "--budget", "2", "{tmp}/missing"], "missing"),
    (["inspect", "--store", "{tmp}/nothing"], "no store here"),
    (["export", "--store", "{tmp}/s", "--slot", "7", "{tmp}/o"], "--slot 7"),
])
def test_errors_are_one_line_and_exit_2(tmp_path, adapter_dirs, capsys, argv, message):
    main(["stream", "--store", str(tmp_path / "s"), "--budget", "2", "--quiet", adapter_dirs[0]])
    capsys.readouterr()
    argv = [a.format(tmp=tmp_path, a0=adapter_dirs[0]) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after any progress bar
    assert last.startswith("kmerge-fast: error:") and message in last


def test_console_script_help():
    for cmd in ([], ["stream"], ["inspect"], ["export"], ["demo"]):
        result = subprocess.run([sys.executable, "-m", "kmerge_fast.cli", *cmd, "--help"], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0 and "usage: kmerge-fast" in result.stdout


# ------------------------------------------------------------ issue 19: the hardened command line
KF = [sys.executable, "-m", "kmerge_fast.cli"]


def run_cli(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*KF, *map(str, argv)], capture_output=True, text=True, timeout=120, **kw)


def manifest_bytes(store) -> bytes:
    return (store / "manifest.json").read_bytes()


def test_help_does_not_import_torch():
    """Building the parser (all of `kmerge-fast --help`) loads no torch: about 1 s saved on every call."""
    code = "import kmerge_fast.cli, sys; kmerge_fast.cli.build_parser(); assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_flag_choices_match_the_library():
    """The CLI's copies of the choices (kept so that the parser imports no torch) equal the library's."""
    from kmerge_fast import cli, online, similarity, store

    assert cli.STRATEGIES == online.STRATEGIES and cli.MODES == online.MODES
    assert cli.DEFAULT_MODE == online.DEFAULT_MODE and cli.METRICS == similarity.METRICS
    assert cli.GGUF_DTYPES == store.GGUF_DTYPES and cli.FORMATS == tuple(store.FORMAT_FILES)


def test_package_names_are_lazy_and_complete():
    code = ("import sys, kmerge_fast as kf\n"
            "assert 'torch' not in sys.modules\n"
            "assert set(kf.__all__) <= set(dir(kf)) and {'d2c', 'online', 'peft'} <= set(dir(kf))\n"
            "import kmerge_fast.online\n"  # sets the package attribute `merge` to the submodule ...
            "assert callable(kf.merge) and kf.merge.__module__ == 'kmerge_fast.merge'\n"  # ... which must not win
            "from kmerge_fast import LoRA, merge, similarity_matrix, OnlineMerger\n"
            "assert kf.LoRA is LoRA and kf.online.OnlineMerger is OnlineMerger and kf.d2c.cluster\n"
            "assert not hasattr(kf, 'no_such_name')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def store2(tmp_path, adapter_dirs):
    """A kmerge store of budget 2 holding task0..task2 (the package's defaults: mode exact, no seed)."""
    store = tmp_path / "store"
    assert main(["stream", "--store", str(store), "--budget", "2", "--quiet", *adapter_dirs[:3]]) == 0
    return store


@pytest.mark.parametrize("flags,message", [
    (["--budget", "3"], "--budget 3 (the store has --budget 2)"),
    (["--strategy", "ties"], "--strategy ties (the store has --strategy kmerge)"),
    (["--mode", "rms"], f"--mode rms (the store has --mode {kf.online.DEFAULT_MODE})"),
    (["--similarity", "l2"], "--similarity l2 (the store has --similarity cos)"),
    (["--threshold", "0.5"], "--threshold 0.5 (the store has no --threshold)"),
    (["--seed", "3"], "--seed 3 (the store has no --seed)"),
    (["--density", "0.3"], "--density 0.3 (the store has --density 0.5)"),
])
def test_stream_refuses_settings_that_differ_from_the_store(store2, adapter_dirs, capsys, flags, message):
    before = manifest_bytes(store2)
    capsys.readouterr()
    assert main(["stream", "--store", str(store2), "--quiet", *flags, adapter_dirs[3]]) == 2
    err = capsys.readouterr().err
    assert message in err and "keeps the settings it was created with" in err
    assert manifest_bytes(store2) == before


def test_stream_accepts_settings_equal_to_the_store(store2, adapter_dirs, capsys):
    assert main(["stream", "--store", str(store2), "--quiet", "--budget", "2", "--strategy", "kmerge",
                 "--mode", kf.online.DEFAULT_MODE, "--similarity", "cos", "--density", "0.5", adapter_dirs[3]]) == 0
    assert "task3: merge" in capsys.readouterr().out


def test_stream_skip_existing_makes_a_rerun_harmless(store2, adapter_dirs, capsys):
    argv = ["stream", "--store", str(store2), "--budget", "2", "--quiet", *adapter_dirs[:3]]
    more = ["stream", "--store", str(store2), "--budget", "2", "--quiet", "--skip-existing", *adapter_dirs[:4]]
    before = manifest_bytes(store2)
    capsys.readouterr()
    assert main(argv) == 2  # without the flag: refused, naming both ways out
    err = capsys.readouterr().err
    assert "task0: already stored (slot 0)" in err and "--skip-existing" in err and "--replace" in err
    assert manifest_bytes(store2) == before
    assert main([*argv, "--skip-existing"]) == 0
    out = capsys.readouterr().out
    assert all(f"task{k}: already stored in slot" in out and "skipped" in out for k in range(3))
    assert manifest_bytes(store2) == before  # nothing was committed
    assert main(more) == 0  # and the new ones are added
    assert "task3: merge" in capsys.readouterr().out


def test_stream_checks_every_adapter_before_the_first_add(tmp_path, store2, adapter_dirs, capsys):
    before = manifest_bytes(store2)
    capsys.readouterr()
    # a missing folder last: nothing of the run is committed
    assert main(["stream", "--store", str(store2), "--quiet", adapter_dirs[3], str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert manifest_bytes(store2) == before
    # an adapter of another base model last
    other = tmp_path / "other" / "task9"
    kf.LoRA.from_factors({"model.layers.0.mlp.up_proj": (torch.ones(2, 8), torch.ones(4, 2))}).save(other)
    assert main(["stream", "--store", str(store2), "--quiet", adapter_dirs[3], str(other)]) == 2
    assert "does not match" in capsys.readouterr().err
    assert manifest_bytes(store2) == before
    # a new store is not even created
    assert main(["stream", "--store", str(tmp_path / "new"), "--budget", "2", "--quiet", adapter_dirs[0],
                 str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "new").exists()


def test_stream_errors_name_flags_not_arguments(tmp_path, store2, adapter_dirs, capsys):
    capsys.readouterr()
    # --replace on a task merged with others
    assert main(["stream", "--store", str(store2), "--quiet", "--replace", adapter_dirs[0]]) == 2
    err = capsys.readouterr().err
    assert "--replace" in err and "replace=True" not in err
    # faithful mode refuses an adapter of another rank: the library says mode='exact'
    faithful = tmp_path / "faithful"
    assert main(["stream", "--store", str(faithful), "--budget", "1", "--mode", "faithful", "--quiet",
                 adapter_dirs[0]]) == 0
    wide = tmp_path / "wide" / "task_wide"
    kf.LoRA.from_factors({n: (torch.cat([m.A, m.A]), torch.cat([m.B, m.B], 1))
                          for n, m in kf.LoRA.load(adapter_dirs[1]).modules.items()}).save(wide)
    capsys.readouterr()
    assert main(["stream", "--store", str(faithful), "--quiet", str(wide)]) == 2
    err = capsys.readouterr().err
    assert "--mode exact" in err and "mode='exact'" not in err
    # the library's argument names become flags
    assert main(["stream", "--store", str(tmp_path / "x"), "--budget", "2", "--strategy", "ties", "--mode", "exact",
                 "--quiet", adapter_dirs[0]]) == 2
    assert "kmerge-fast: error: --mode: 'exact' applies" in capsys.readouterr().err


def test_cli_message_translation():
    from kmerge_fast.cli import cli_message

    assert cli_message("task: 'a' is already stored (slot 0); pass replace=True to replace it") == \
        "task: 'a' is already stored (slot 0); pass --replace to replace it"
    assert cli_message("budget: must be an int >= 1, got 0") == "--budget: must be an int >= 1, got 0"
    assert cli_message("x: need equal ranks (use mode='exact')") == "x: need equal ranks (use --mode exact)"
    assert "--calibrate" in cli_message("threshold: kmerge++ needs a finite number or 'auto', got nan "
                                        "(see kf.calibrate_threshold, kf.online.width_threshold)")
    assert cli_message("/a/b: no store here") == "/a/b: no store here"


def test_stream_oracle_takes_a_groups_file(tmp_path, adapter_dirs, capsys):
    store = str(tmp_path / "oracle")
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"task0": "even", "task1": "odd", "task2": "even"}))
    base = ["stream", "--store", store, "--quiet"]
    assert main([*base, "--budget", "2", "--strategy", "oracle", adapter_dirs[0]]) == 2
    assert "--groups" in capsys.readouterr().err  # the strategy needs the file
    assert main([*base, "--budget", "2", "--strategy", "oracle", "--groups", str(groups), *adapter_dirs[:4]]) == 2
    assert "no group for tasks ['task3']" in capsys.readouterr().err
    assert not (tmp_path / "oracle").exists()
    assert main([*base, "--budget", "2", "--strategy", "oracle", "--groups", str(groups), *adapter_dirs[:3]]) == 0
    assert "task2: merge -> slot 0" in capsys.readouterr().out
    # resuming an oracle store needs the file again; a plain store refuses one
    assert main([*base, adapter_dirs[3]]) == 2
    assert "--groups" in capsys.readouterr().err
    groups.write_text(json.dumps({"task3": "odd", "task4": "even"}))
    assert main([*base, "--groups", str(groups), adapter_dirs[3]]) == 0
    assert "task3: merge -> slot 1" in capsys.readouterr().out
    plain = str(tmp_path / "plain")
    assert main(["stream", "--store", plain, "--budget", "2", "--quiet", adapter_dirs[0]]) == 0
    assert main(["stream", "--store", plain, "--quiet", "--groups", str(groups), adapter_dirs[4]]) == 2
    assert "only --strategy oracle uses a groups file" in capsys.readouterr().err


def test_stream_calibrates_kmerge_pp_on_held_out_adapters(tmp_path, adapter_dirs, capsys):
    store = tmp_path / "pp"
    held_out = adapter_dirs[2:]
    argv = ["stream", "--store", str(store), "--budget", "2", "--strategy", "kmerge++", "--quiet",
            *adapter_dirs[:2], "--calibrate", *held_out]
    assert main(argv) == 0
    want = kf.calibrate_threshold([kf.LoRA.load(p) for p in held_out])
    assert json.loads((store / "manifest.json").read_text())["settings"]["threshold"] == pytest.approx(want)
    assert main([*argv, "--skip-existing"]) == 0  # the same calibration again: accepted
    other = [*argv[:argv.index("--calibrate") + 1], adapter_dirs[2], adapter_dirs[4], "--skip-existing"]
    assert main(other) == 2  # another calibration (one family: a high median): a different threshold
    assert "--calibrate (threshold" in capsys.readouterr().err
    assert main(["stream", "--store", str(tmp_path / "k"), "--budget", "2", "--quiet", adapter_dirs[0],
                 "--calibrate", *held_out]) == 2
    assert "--calibrate: only --strategy kmerge++" in capsys.readouterr().err
    assert main(["stream", "--store", str(tmp_path / "k"), "--budget", "2", "--strategy", "kmerge++", "--quiet",
                 adapter_dirs[0], "--calibrate", adapter_dirs[0], adapter_dirs[1]]) == 2
    assert "is also streamed" in capsys.readouterr().err


def test_stream_ctrl_c_stops_cleanly_and_the_store_resumes(tmp_path):
    """SIGINT mid-stream: exit 130, one line saying how far it got, no traceback; the store opens."""
    import re
    import signal

    from kmerge_fast.cli import _synthetic_adapters

    paths = [str(p) for p in _synthetic_adapters(tmp_path / "a", 40, layers=2, hidden=128, rank=4, seed=0)]
    store = tmp_path / "store"
    argv = [*KF, "stream", "--store", str(store), "--budget", "4", "--quiet", *paths]
    # default SIGINT handling even if this test runs where the shell ignores it (a background job)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stdout.readline()  # the first add is committed and reported
        assert "task_0: new -> slot 0" in first, first + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    match = re.fullmatch(r"kmerge-fast: interrupted after (\d+) of 40 adds; the store holds (\d+) tasks in "
                         r"(\d+) slots \(.*\)", err.strip())
    assert match, err
    done, held = int(match[1]), int(match[2])
    assert 1 <= done <= held < 40
    with kf.OnlineMerger.open(store) as m:
        assert sum(map(len, m.members)) == held
    # the same command with --skip-existing finishes the stream
    result = subprocess.run([*argv, "--skip-existing"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("skipped") == held
    with kf.OnlineMerger.open(store) as m:
        assert sorted(t for ms in m.members for t in ms) == sorted(f"task_{k}" for k in range(40))


def test_cluster_base_without_tokenizer_and_optional_examples(tmp_path, adapter_dirs, capsys):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps({"task": f"task{k}", "prompt": "p", "target": "t"}) + "\n"
                                for k in range(5)))
    args = ["cluster", "--budget", "2", "--quiet", *adapter_dirs]
    assert main([*args, "--base", str(base), "--examples", str(examples), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--base" in err and "no tokenizer" in err
    with pytest.raises(SystemExit) as exit_:  # d2c needs examples: an argparse error
        main([*args, "--base", str(base), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "--examples" in capsys.readouterr().err
    # kmeans and random need neither examples nor a base model
    for method in ("kmeans", "random"):
        assert main([*args, "--method", method, "--out", str(tmp_path / method)]) == 0
        assert len(json.loads((tmp_path / method / "assignment.json").read_text())["clusters"]) == 2


def test_inspect_does_not_import_torch(store2):
    code = ("import sys, kmerge_fast.cli as cli\n"
            f"assert cli.main(['inspect', '--store', {str(store2)!r}]) == 0\n"
            "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "task0, task2" in result.stdout


def test_inspect_and_export_are_readers(tmp_path, store2, capsys):
    """They work while a writer holds the store (before: "open by another writer")."""
    with kf.OnlineMerger.open(store2) as writer:
        assert main(["inspect", "--store", str(store2)]) == 0
        assert main(["export", "--store", str(store2), "--slot", "0", str(tmp_path / "out")]) == 0
        for name, mod in writer.slots[0].modules.items():
            assert torch.equal(kf.LoRA.load(tmp_path / "out").modules[name].B, mod.B)
    assert "task0, task2" in capsys.readouterr().out


def test_export_refuses_a_non_empty_target_unless_force(tmp_path, store2, adapter_dirs, capsys):
    target = tmp_path / "adapters" / "task4"  # an existing adapter folder
    before = (target / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["export", "--store", str(store2), "--slot", "1", str(target)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err and "overwrite=True" not in err
    assert (target / "adapter_model.safetensors").read_bytes() == before
    assert main(["export", "--store", str(store2), "--slot", "1", "--force", str(target)]) == 0
    with kf.OnlineMerger.open(store2, readonly=True) as m:
        assert kf.LoRA.load(target).ranks == m.slots[1].ranks
        assert torch.equal(next(iter(kf.LoRA.load(target).modules.values())).A,
                           next(iter(m.slots[1].modules.values())).A)
    (tmp_path / "empty").mkdir()
    assert main(["export", "--store", str(store2), "--slot", "0", str(tmp_path / "empty")]) == 0


def test_export_never_writes_inside_a_store(store2, capsys):
    before = manifest_bytes(store2)
    slot_dir = sorted((store2 / "slots").iterdir())[0]
    for target in (store2, store2 / "slots" / "x", slot_dir, store2 / "new" / "deep"):
        capsys.readouterr()
        assert main(["export", "--store", str(store2), "--slot", "0", "--force", str(target)]) == 2
        assert "inside the kmerge_fast store" in capsys.readouterr().err
    assert manifest_bytes(store2) == before
    assert not (store2 / "slots" / "x").exists() and not (store2 / "new").exists()
    with kf.OnlineMerger.open(store2) as m:  # every checksum still holds
        assert m.members == [["task0", "task2"], ["task1"]]


# ------------------------------------------------------------ issue 21: slots in GGUF and MLX
def run_main(capsys, *argv) -> tuple[int, str, str]:
    """main() in this process (a subprocess costs a torch import): (status, stdout, last line of stderr)."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, (err.strip().splitlines() or [""])[-1]


def test_stream_emit_inspect_export_in_each_format(tmp_path, adapter_dirs, capsys):
    """--emit writes every slot also as GGUF and MLX; inspect lists the files; export writes each format."""
    gguf_base = pytest.importorskip("helpers.gguf_base")
    base = gguf_base.write_base(tmp_path / "base.gguf")
    store = tmp_path / "store"
    emit = ["--emit", "gguf", "--emit", "mlx", "--base", base]
    result = run_cli("stream", "--store", store, "--budget", "2", "--quiet", *emit, *adapter_dirs[:3])
    assert result.returncode == 0, result.stderr
    assert run_main(capsys, "stream", "--store", store, "--quiet", "--base", base, adapter_dirs[3])[0] == 0
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["settings"]["formats"] == ["peft", "gguf", "mlx"]
    code = ("import sys, kmerge_fast.cli as cli\n"  # inspect a store of formats: still no torch
            f"assert cli.main(['inspect', '--store', {str(store)!r}]) == 0\n"
            "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    table = result.stdout
    assert f"formats: peft, gguf (base {base}, f32), mlx" in table
    for slot in manifest["slots"]:
        for name in slot["files"]:
            size = (store / "slots" / slot["dir"] / name).stat().st_size
            assert f"{size:,}  {slot['dir']}/{name}" in table
    result = run_cli("export", "--store", store, "--slot", "0", "--format", "gguf", tmp_path / "slot0.gguf")
    assert result.returncode == 0 and "(gguf)" in result.stdout, result.stderr
    with kf.OnlineMerger.open(store, readonly=True) as m:
        want = m.slots[0]
        for fmt, out in (("mlx", tmp_path / "slot0_mlx"), ("peft", tmp_path / "p")):
            assert run_main(capsys, "export", "--store", store, "--slot", "0", "--format", fmt, out)[0] == 0
        for out in (tmp_path / "slot0.gguf", tmp_path / "slot0_mlx", tmp_path / "p"):
            got = kf.LoRA.load(out)
            assert all(torch.equal(got.modules[n].B, mod.B) for n, mod in want.modules.items())
    status, *_ = run_main(capsys, "export", "--store", store, "--slot", "1", "--format", "gguf", "--dtype", "bf16",
                          tmp_path / "b.gguf")
    assert status == 0 and kf.LoRA.load(tmp_path / "b.gguf").dtype == torch.bfloat16
    # settings that differ from the store's are refused, naming the flags
    for flags, message in ((["--emit", "gguf"], "--emit gguf (the store has --emit gguf --emit mlx)"),
                           (["--base", tmp_path / "other.gguf"], f"(the store has --base {base})"),
                           (["--dtype", "f16"], "--dtype f16 (the store has --dtype f32)")):
        status, _, err = run_main(capsys, "stream", "--store", store, "--quiet", *flags, adapter_dirs[4])
        assert status == 2 and message in err, err
    assert json.loads((store / "manifest.json").read_text()) == manifest
    status, _, err = run_main(capsys, "export", "--store", store, "--slot", "0", "--format", "mlx", "--base", base,
                              tmp_path / "m2")
    assert status == 2 and "--base: only --format gguf takes it" in err


def test_stream_emit_errors_come_before_the_store(tmp_path, adapter_dirs, capsys):
    gguf_base = pytest.importorskip("helpers.gguf_base")
    base = gguf_base.write_base(tmp_path / "base.gguf")
    store = tmp_path / "store"
    wide = tmp_path / "wide" / "task_lm"
    kf.LoRA.from_factors({**{n: (m.A, m.B) for n, m in kf.LoRA.load(adapter_dirs[0]).modules.items()},
                          "lm_head": (torch.ones(2, 32), torch.ones(8, 2))}).save(wide)
    for argv, message in ((["--emit", "gguf", adapter_dirs[0]], "--base: the gguf format needs the base model"),
                          (["--base", base, adapter_dirs[0]], "--base: only --emit gguf uses it"),
                          (["--emit", "mlx", "--dtype", "f16", adapter_dirs[0]], "--dtype: only --emit gguf uses it"),
                          (["--emit", "gguf", "--base", tmp_path / "no.gguf", adapter_dirs[0]], "not found"),
                          (["--emit", "gguf", "--base", base, wide], "llama.cpp cannot place these modules: "
                                                                     "'lm_head'")):
        status, _, err = run_main(capsys, "stream", "--store", store, "--budget", "2", "--quiet", *argv)
        assert status == 2 and message in err, err
        assert not store.exists()
    # on an existing store the newcomers are checked against its formats before the first add
    assert run_main(capsys, "stream", "--store", store, "--budget", "2", "--quiet", "--emit", "gguf", "--base", base,
                    adapter_dirs[0])[0] == 0
    before = manifest_bytes(store)
    comma = tmp_path / "x" / "task,9"
    kf.LoRA.load(adapter_dirs[1]).save(comma)
    status, _, err = run_main(capsys, "stream", "--store", store, "--quiet", adapter_dirs[1], comma)
    assert status == 2 and "holds a comma" in err and manifest_bytes(store) == before
