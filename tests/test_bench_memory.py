"""bench/memory.py and the workers' memory sample read real processes' figures from /proc."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.memory import peak_rss_bytes, pss_bytes
from bench.worker_proc import MemorySample


def test_pss_is_at_most_the_peak_rss_and_sampled_for_every_worker_process() -> None:
    own = pss_bytes(os.getpid())
    rss = peak_rss_bytes(os.getpid())
    assert own is not None
    assert rss is not None
    assert 0 < own <= rss
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        sample = MemorySample()
        sample.record([os.getpid()])
        assert child.pid in sample.pss_per_process
        assert set(sample.pss_per_process) == set(sample.per_process)
        # One sample: the peak sum is that sample's sum, above either process alone.
        assert sample.pss_sum_peak == sum(pss for _, pss in sample.pss_per_process.values())
        assert sample.pss_sum_peak > sample.max_process_pss
    finally:
        child.communicate(b"")
    assert pss_bytes(child.pid) is None  # gone: no figure, no error
