"""Teacher-forced scoring in worker processes of one torch thread each.

The passes of a 135M model have small matmuls, which scale poorly over
threads on some CPUs, so N one-thread processes can score more passes per
second than one N-thread process: about 1.3x with two workers on a 2-core
Xeon with AMX, 1.03-1.06x on a 2-core EPYC (Zen 4; ``python -m
bench.quality.pass_timing``). The scores no longer depend on the number of
cores: where a pass's bits depend on the threads that ran it (bfloat16
reductions split per thread, as on that Xeon), a worker always runs one,
whatever the number of workers. They still depend on the CPU's kernels.

Each worker holds its own copy of the base model (the parent's, less its
forward hooks) and its own :class:`kmerge_fast.scoring._Hooks`; jobs are
(adapter, task) passes taken from one queue, so the workers stay busy until
the queue is empty. A worker's result equals ``teacher_forced`` run in the
parent under ``torch.set_num_threads(1)``, bit for bit.
"""

from __future__ import annotations

import copy
import io
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback

import torch

from kmerge_fast.scoring import _Hooks

#: torch threads per worker (the scores depend on it: see the module docstring)
THREADS = 1


def _serve(model_path: str, pairs: dict, prefix: dict, pad: int, batch_size: int, jobs, results) -> None:
    """A worker's loop: (key, adapter bytes | None, task) jobs in, (key, task, scores | error) out; None stops."""
    from .scoring import teacher_forced

    torch.set_num_threads(THREADS)
    model = torch.load(model_path, weights_only=False).eval()
    param = next(model.parameters())
    hooks = _Hooks(model)
    loaded = None
    while True:
        job = jobs.get()
        if job is None:
            return
        key, blob, task = job
        try:
            if key != loaded:
                hooks.active = {}
                if blob is not None:
                    hooks.load(torch.load(io.BytesIO(blob), weights_only=False), param.dtype, param.device)
                loaded = key
            results.put((key, task, teacher_forced(model, pairs[task], prefix[task], pad, batch_size), None))
        except Exception:  # noqa: BLE001 - reported to the parent, which raises it
            results.put((key, task, None, traceback.format_exc()))


class ScoringPool:
    """``workers`` processes scoring (adapter, task) passes; :meth:`run` hands out jobs and collects them.

    Args:
        model: the base model (CPU); copied to each worker without its forward hooks.
        pairs, prefix, pad, batch_size: as :class:`bench.quality.scoring.Scorer` holds them.
        workers: processes (>= 2; one thread each).
    """

    def __init__(self, model, pairs: dict, prefix: dict, pad: int, batch_size: int, workers: int):
        if next(model.parameters()).device.type != "cpu":
            raise ValueError("workers: scoring workers are for the CPU (a GPU scores in the parent process)")
        ctx = mp.get_context("spawn")    # fork would copy the parent's OpenMP state, which hangs workers
        clean = copy.deepcopy(model)
        for m in clean.modules():        # our hooks' closures neither pickle nor belong in a worker
            m._forward_hooks.clear()
            m._forward_hooks_with_kwargs.clear()
        fd, self._model_path = tempfile.mkstemp(prefix="kmerge_quality_model_", suffix=".pt")
        os.close(fd)
        torch.save(clean, self._model_path)
        del clean
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        self.procs = [ctx.Process(target=_serve, daemon=True, name=f"scoring-worker-{i}",
                                  args=(self._model_path, pairs, prefix, pad, batch_size, self.jobs, self.results))
                      for i in range(workers)]
        for p in self.procs:
            p.start()

    def run(self, jobs: list[tuple[str, object, str]]) -> dict[tuple[str, str], dict]:
        """Score ``jobs`` = [(adapter key, LoRA | None, task)]; returns {(key, task): scores}."""
        blobs: dict[str, bytes | None] = {}
        for key, lora, task in jobs:
            if key not in blobs:
                if lora is None:
                    blobs[key] = None
                else:
                    buf = io.BytesIO()
                    torch.save(lora, buf)
                    blobs[key] = buf.getvalue()
            self.jobs.put((key, blobs[key], task))
        out = {}
        while len(out) < len(jobs):
            try:
                key, task, scores, error = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    self.close()
                    raise RuntimeError(f"{dead[0].name} exited (code {dead[0].exitcode}) with "
                                       f"{len(jobs) - len(out)} passes left") from None
                continue
            if error is not None:
                self.close()     # the queues still hold this run's other jobs: the pool is spent
                raise RuntimeError(f"scoring worker failed on task {task!r}:\n{error}")
            out[key, task] = scores
        return out

    def close(self) -> None:
        """Stop the workers and remove the model copy."""
        for _ in self.procs:
            self.jobs.put(None)
        deadline = time.time() + 10
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.time()))
            if p.is_alive():
                p.terminate()
        self.procs = []
        if os.path.exists(self._model_path):
            os.remove(self._model_path)
