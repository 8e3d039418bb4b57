"""The command limits glibc's malloc arenas (aprtui.cli.MALLOC_ARENAS): threads that allocate
share one heap instead of each keeping its own freed memory (~160 MB of a 512-token bisect)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys, tempfile, threading
if sys.argv[1] == "limited":
    from aprtui.cli import _limit_malloc_arenas
    _limit_malloc_arenas()
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
