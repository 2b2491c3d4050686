"""Freed data buffers stay mapped in the daemons (design change 36): a
new 1 MiB buffer reuses the pages of the one freed before it instead of
faulting in 256 fresh ones."""

import subprocess
import sys

PROBE = """
import resource, sys
from vdifs.cli.heap import keep_freed_buffers
if sys.argv[1] == "kept":
    assert keep_freed_buffers()
for _ in range(5):  # let the allocator settle
    bytearray(1 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):  # as requests do: several buffers in flight, then all freed
    bufs = [bytearray(1 << 20) for _ in range(8)]
    del bufs
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_a_freed_buffer_is_reused_without_page_faults():
    default, kept = faults("default"), faults("kept")
    assert kept < 2 * 8 * 256, f"{kept} page faults for 400 buffers of 1 MiB: more than the first round's"
    assert default > 50 * 256, f"the default allocator took only {default} faults: the probe shows nothing"
