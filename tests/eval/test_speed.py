import os
import subprocess
import sys

import pytest

from lowbit.eval import measure_throughput


def test_throughput_is_positive(model):
    r = measure_throughput(model, prompt_len=8, new_tokens=4, batch=2, warmup=1, repeats=2)
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert r["peak_rss_mb"] > 0
    assert (r["prompt_len"], r["new_tokens"], r["batch"]) == (8, 4, 2)


def test_throughput_hands_the_model_back_in_its_mode(make_llama):
    m = make_llama().train()
    measure_throughput(m, prompt_len=4, new_tokens=2, warmup=0, repeats=1)
    assert m.training


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM is Linux's")
def test_peak_memory_of_a_child_is_its_own():
    """ru_maxrss carries the parent's resident set over fork + exec; a `lowbit bench` started by a
    benchmark that holds models must not report the benchmark's memory."""
    held = bytearray(1200 * 2**20)
    held[::4096] = b"\x01" * len(held[::4096])  # touch every page so it is resident
    code = "from lowbit.eval.speed import _peak_rss; print(_peak_rss()[0])"
    child_mb = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < child_mb < 1000
    del held
