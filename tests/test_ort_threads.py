"""Every ONNX Runtime session of a process shares one thread pool (runtime/ort_threads.py): the
embedding and decoder graphs take turns at each token, and a pool of their own each left one of them
spinning against the other. Run in a fresh process, because ONNX Runtime makes that pool once."""

import subprocess
import sys

SCRIPT = """
import os, sys, warnings
import numpy, onnxruntime
from hovle_edge.runtime import Pipeline

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
with Pipeline.from_dir(sys.argv[1], threads=3) as pipe:
    first = threads() - before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Pipeline.from_dir(sys.argv[1], threads=3):
            second = threads() - before
        same = len(caught)
        with Pipeline.from_dir(sys.argv[1], threads=2):
            other = [str(w.message) for w in caught]
    ids, _ = pipe.generate_ids(pipe.new_cache(capacity=16), [1, 5, 6], stop_ids=(), max_new_tokens=3)
print(first, second, same, len(ids))
print(other[0] if other else "")
"""


def test_sessions_of_a_process_share_one_pool(tiny_export):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_export)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    counts, warning = out.stdout.strip().splitlines()
    first, second, same, tokens = map(int, counts.split())
    # Three graphs with a 3-thread pool each would start 6 threads; one shared pool starts 2 (the caller is the third).
    assert (first, second) == (2, 2)
    assert same == 0 and tokens == 3
    assert "has 3 threads; this session shares it instead of 2 threads" in warning
