"""The command tunes glibc's malloc (aprtui.cli._tune_malloc): threads that allocate share
MALLOC_ARENAS heaps instead of each keeping its own freed memory (~160 MB of a 512-token
bisect), and arrays below MALLOC_MMAP_THRESHOLD come from the heap instead of being mapped and
unmapped every time (a pass's temporaries)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys, tempfile, threading
if sys.argv[1] == "limited":
    from aprtui.cli import _tune_malloc
    _tune_malloc()
def allocate():
    keep = [bytearray(200_000) for _ in range(20)]  # malloc'd by this thread
    barrier.wait()
barrier = threading.Barrier(4)
threads = [threading.Thread(target=allocate) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
path = tempfile.mktemp()
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(stream))
libc.fclose(ctypes.c_void_p(stream))
print(open(path).read().count("<heap nr="))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_threads_share_the_limited_arenas():
    def heaps(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0 and "malloc_info" in done.stderr:
            pytest.skip("not glibc")
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip())

    from aprtui.cli import MALLOC_ARENAS

    assert heaps("default") > MALLOC_ARENAS  # without the limit each thread gets its own
    assert heaps("limited") == MALLOC_ARENAS


MAPPED_PROBE = r"""
import ctypes, re, sys, tempfile
if sys.argv[1] == "tuned":
    from aprtui.cli import _tune_malloc
    _tune_malloc()
size = int(sys.argv[2])
keep = bytearray(size)  # held while malloc_info looks
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
path = tempfile.mktemp()
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(stream))
libc.fclose(ctypes.c_void_p(stream))
print(re.search(r'<total type="mmap" count="(\d+)"', open(path).read()).group(1))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_arrays_below_the_threshold_come_from_the_heap():
    from aprtui.cli import MALLOC_MMAP_THRESHOLD

    def mapped(mode: str, size: int) -> int:
        done = subprocess.run(
            [sys.executable, "-c", MAPPED_PROBE, mode, str(size)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0 and "malloc_info" in done.stderr:
            pytest.skip("not glibc")
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip())

    # Counted against a run that allocates 10 bytes: startup leaves a few mapped chunks alive.
    below, above = MALLOC_MMAP_THRESHOLD // 2, MALLOC_MMAP_THRESHOLD * 2
    assert mapped("default", below) == mapped("default", 10) + 1  # glibc starts at 128 KiB
    assert mapped("tuned", below) == mapped("tuned", 10)
    assert mapped("tuned", above) == mapped("tuned", 10) + 1  # large arrays are still mapped
