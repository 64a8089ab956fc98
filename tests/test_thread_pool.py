"""Stress test of the CPU kernels' thread pool (csrc/cpu/parallel.cpp).

A pool whose job state is shared between jobs lets a worker that is late from
one job claim a ticket of the next one: a chunk then runs twice, or not at
all, or the caller waits forever.  Thousands of tiny back-to-back jobs from
several Python threads on an oversubscribed pool (16 workers on the CI's 2
cores) open those windows often; the test hook counts every item of every
job and reports the ones that did not run exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import mlx_fused_losses._ext as ext
import pytest

# Runs in a fresh interpreter: the pool is sized once per process from
# FL_NUM_THREADS.  Each Python thread uses its own item count so that jobs of
# different chunk counts follow each other on the shared pool.
_STRESS = textwrap.dedent(
    """
    import threading
    import mlx_fused_losses._ext as ext

    assert ext.num_threads() == 16, ext.num_threads()
    results = {}

    def hammer(n):
        results[n] = ext._parallel_for_miscounts(jobs=JOBS, n=n, grain=1)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in (3, 17, 64, 257)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(sorted(results.items()))
    assert all(bad == 0 for bad in results.values()), results
    """
)


def _run_stress(jobs: int, jitter: bool, threads: int = 16, timeout: float = 60.0):
    env = {**os.environ, "FL_NUM_THREADS": str(threads)}
    env.pop("FL_POOL_JITTER", None)
    if jitter:
        # Workers yield where they can fall behind (after waking, between
        # claiming a ticket and comparing it): the shared-state pool hung in
        # every such run; without jitter only in about one run in ten.
        env["FL_POOL_JITTER"] = "1"
    return subprocess.run(
        [sys.executable, "-c", _STRESS.replace("JOBS", str(jobs))],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,  # a lost chunk count shows up as a hang
    )


@pytest.mark.parametrize("jitter", [False, True], ids=["plain", "jitter"])
def test_every_chunk_runs_exactly_once_oversubscribed(jitter):
    proc = _run_stress(jobs=3000, jitter=jitter)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hook_counts_items_in_this_process():
    # The hook itself: one job, every item once, whatever the pool size.
    assert ext._parallel_for_miscounts(jobs=1, n=1000, grain=7) == 0
    assert ext._parallel_for_miscounts(jobs=5, n=1, grain=1) == 0
