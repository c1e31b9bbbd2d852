"""The kmerge-fast command line: demo, stream, inspect, export, and its errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kmerge_fast as kf
from kmerge_fast.cli import main
from test_online import family_adapters


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
