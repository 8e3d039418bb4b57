"""A forked child process that decodes weights into shared memory while the pass computes.

Why a process and not a thread: dequantizing is numpy's work, and a numpy call releases the
GIL only while its loop runs. A decoding thread beside a pass that runs Python between its
numpy calls (statistics, file writes, the plan) hands the GIL back and forth at every call:
measured on the 2-core development VM, whole-process `apr-tui trace` of SmolLM2 (37 tokens, all
stages, min of 6 interleaved runs), weights decoded one ahead in a thread took 1.56-2.71 s
wall and 1,182-2,833 voluntary context switches, against 1.40-1.82 s and 1 switch decoding
inline. A forked child has its own interpreter: it decodes on the idle core without touching
the pass's GIL, and the pass pays only for a message per weight (measured: engine.prefetch).

How: `os.fork` right where it is needed, so the child inherits the opened model (its memory
map, its tensor records) and reads nothing again. The parent numbers what the pass will ask
for (`seq`) and sends requests `(seq, slot, item)` on a pipe, as many as it has free slots;
the child decodes each with the very code the parent would run (`decode_item`: same bits by
construction), copies it into its slot of an anonymous shared mapping and answers
`(seq, slot, count)` on a second pipe, in order. The parent hands the pass a read-only view of
the slot, and asks the slot to hold another item only once no array views it any more (a
ctypes exporter per loan, whose reference count every view of it keeps up).

The pass never waits for work the child has not begun: counters at the head of the shared
mapping say how far each side is (`taken`: the last item the parent no longer wants; `started`:
the item the child is decoding; per slot, an item the parent took back). When the pass needs an
item the child has not finished, it decodes the item itself unless the child is on that very
item, and the child skips it; when the child is on it, the pass decodes a later item the child
has not begun (the furthest asked) rather than wait, and waits only when there is none. On a
busy machine the child falls behind and the pass simply decodes more itself; no share of the
work is fixed in advance.

The child is kept harmless:
- it closes every descriptor it inherited but its two pipes (a trace directory's flock, a
  temporary's lock, a terminal: a lock shared with a lingering child would outlive the run),
  its stdin, stdout and stderr reopened on /dev/null;
- it ignores SIGINT (Ctrl+C reaches the whole process group; the parent decides) and dies on
  SIGTERM; it ends with `os._exit`, never running the parent's cleanup, flushing the parent's
  buffers or raising into the parent's stack;
- it ends when the request pipe closes: when the parent closes the decoder, and also when the
  parent dies however it dies;
- it never uses a lock another thread may have held at the fork: the store it is given is the
  one that decodes (not a cache in front of it) and engine.parallel's chunk pool is replaced.

A failure is never the child's to report: a decode that raised, a child that died or went
silent for REPLY_TIMEOUT_S, all make `take` return None, and the caller decodes the weight
itself (raising, if the file is corrupt, exactly the error it would have raised anyway).
"""

from __future__ import annotations

import gc
import mmap
import os
import select
import signal
import struct
import sys
import warnings
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import numpy as np

from engine.model import weight_rows

Item = tuple[str, int, int]
"""(name, -1, -1): a whole tensor; (name, start, stop): rows [start, stop) of a 2-D one."""


def decode_item(store: Any, item: Item) -> np.ndarray:
    """`item` decoded by `store`: what the pass, and the child for it, call."""
    name, start, stop = item
    return store.get(name) if start < 0 else weight_rows(store, name, start, stop)


REPLY_TIMEOUT_S = 60.0
"""How long the parent waits for the one decode it waits for before it stops the child and
decodes itself. A SmolLM2 matrix takes ~2 ms; a minute only ever passes if the child hangs or
the machine is swapping, and then decoding in the parent is the way on."""

_REQUEST = struct.Struct("<qiqqI")  # seq, slot, rows start, stop (-1: whole), name length
_REPLY = struct.Struct("<qiq")  # seq, slot, float32 values written (negative: none)
_SKIPPED, _FAILED = -2, -1
_TAKEN, _STARTED = 0, 1  # the two counters at the head of the mapping, then one per slot:
# the seq the parent took back from that slot (the child skips the request if it matches)


class DecoderProcess:
    """A child that decodes `store`'s weights into `slots` shared slots of `slot_bytes` each.

    `patient`: wait for every item asked, also one the child has not begun (tests use it to
    have the child deliver everything; a pass would rather decode such an item itself)."""

    def __init__(self, store: Any, slot_bytes: int, slots: int, *, patient: bool = False) -> None:
        self.patient = patient
        self.slot_values = -(-slot_bytes // 64) * 16  # float32s, each slot 64-byte aligned
        self.header_bytes = -(-8 * (2 + slots) // 64) * 64
        self.shared = mmap.mmap(-1, self.header_bytes + 4 * self.slot_values * slots)
        self.counters = np.frombuffer(self.shared, dtype=np.int64, count=2 + slots)
        self.counters[:] = -1  # [taken, started, taken back from slot 0, slot 1, ...]
        self.stolen: dict[int, np.ndarray | None] = {}  # seq -> what the parent decoded itself
        self.free: list[int] = list(range(slots))
        self.lent: dict[int, Any] = {}  # slot -> the ctypes buffer its handed-out array views
        self.pending: deque[tuple[int, int]] = deque()  # (seq, slot) asked, not yet answered
        self.ready: dict[int, tuple[int, int]] = {}  # seq -> (slot, count) answered, not taken
        self._unread = b""
        self.pid = 0
        self.requests = self.replies = -1
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            with warnings.catch_warnings():  # Python 3.12+: "multi-threaded, fork() may deadlock"
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # the child: never returns
                _child_main(
                    store, self.shared, self.header_bytes, self.slot_values, request_r, reply_w
                )
        except BaseException:
            for fd in (request_r, request_w, reply_r, reply_w):
                os.close(fd)
            del self.counters
            self.shared.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(request_r)
        os.close(reply_w)
        self.pid, self.requests, self.replies = pid, request_w, reply_r

    @property
    def alive(self) -> bool:
        return self.pid != 0

    def request(self, seq: int, item: Item) -> bool:
        """Ask for `item` (name, start, stop: rows, or -1, -1 for the whole tensor), the pass's
        `seq`-th, to be decoded; False when no slot is free (or the child is gone)."""
        if not self.alive:
            return False
        if not self.free:
            self._reclaim()
            self._collect(wait=False)  # answers already in free the slots of passed items
            if not self.free:
                return False
        slot = self.free.pop()
        name, start, stop = item
        encoded = name.encode("utf-8")
        try:
            os.write(self.requests, _REQUEST.pack(seq, slot, start, stop, len(encoded)) + encoded)
        except OSError:  # the child is gone (EPIPE)
            self.free.append(slot)
            self.stop()
            return False
        self.pending.append((seq, slot))
        return True

    def take(
        self,
        seq: int,
        shape: tuple[int, ...],
        meanwhile: Callable[[int], np.ndarray | None] | None = None,
    ) -> np.ndarray | None:
        """Item `seq` as a read-only float32 array of `shape` if the child has it or is decoding
        it; None when the caller is to decode it itself (the child then skips it).

        Rather than wait for the child, the caller decodes a later item the child has not begun
        (`meanwhile(its seq)`, the furthest one asked): the child skips it, and `take` returns
        it when its turn comes. The array views its slot (no copy): the slot is lent until every
        array viewing it is gone, and only then asked to hold another item (`_reclaim`)."""
        self.counters[_TAKEN] = max(int(self.counters[_TAKEN]), seq - 1)  # earlier: not wanted
        if seq in self.stolen:
            self.counters[_TAKEN] = max(int(self.counters[_TAKEN]), seq)  # a late answer: freed
            return self.stolen.pop(seq)
        self._collect(wait=False)
        while seq not in self.ready:
            asked = any(asked_seq == seq for asked_seq, _ in self.pending)
            if not asked or (int(self.counters[_STARTED]) != seq and not self.patient):
                self.counters[_TAKEN] = max(int(self.counters[_TAKEN]), seq)  # ours: skip it
                return None
            if meanwhile is not None and not self.patient and self._steal(meanwhile):
                self._collect(wait=False)
                continue
            if not self._collect(wait=True):  # the child is on it: wait for its answer
                self.stop()
                return None
        slot, count = self.ready.pop(seq)
        if count != int(np.prod(shape, dtype=np.int64)):
            self.free.append(slot)
            return None  # the decode failed: the caller's own decode reports why
        start = self.header_bytes + 4 * self.slot_values * slot
        # An exporter of its own per loan: every array made from this one (views, transposes)
        # keeps it referenced, so its reference count says whether any of them is alive.
        import ctypes

        lent = (ctypes.c_char * (4 * count)).from_buffer(self.shared, start)
        self.lent[slot] = lent
        values = np.frombuffer(lent, dtype=np.float32).reshape(shape)
        values.flags.writeable = False  # the pass's weights are never edited in place
        return values

    def _steal(self, decode: Callable[[int], np.ndarray | None]) -> bool:
        """Take back the furthest asked item the child has not begun and decode it here; False
        when there is none."""
        started = int(self.counters[_STARTED])
        for asked_seq, slot in reversed(self.pending):
            if asked_seq <= started or asked_seq in self.stolen:
                continue
            self.counters[2 + slot] = asked_seq  # the child skips it, unless already begun
            self.stolen[asked_seq] = decode(asked_seq)
            return True
        return False

    def _reclaim(self) -> None:
        """Free the lent slots no array views any more (their exporter referenced only by
        `self.lent` and by getrefcount's own argument)."""
        for slot in list(self.lent):
            if sys.getrefcount(self.lent[slot]) <= 2:
                del self.lent[slot]
                self.free.append(slot)

    def _collect(self, wait: bool) -> bool:
        """Read the answers that have arrived (with `wait`, at least one, or time out). Answers
        for items the parent has passed free their slots at once. False if the child is gone."""
        timeout = REPLY_TIMEOUT_S if wait else 0.0
        while self.pending:
            ready, _, _ = select.select([self.replies], [], [], timeout)
            if not ready:
                return timeout == 0.0  # nothing (more) there; waited in vain: the child hangs
            try:
                data = os.read(self.replies, _REPLY.size * len(self.pending))
            except OSError:
                data = b""
            if not data:  # EOF: the child exited
                self.stop()
                return False
            self._unread += data
            while len(self._unread) >= _REPLY.size:
                seq, slot, count = _REPLY.unpack_from(self._unread)
                self._unread = self._unread[_REPLY.size :]
                asked_seq, asked_slot = self.pending.popleft()
                if (seq, slot) != (asked_seq, asked_slot):  # out of step: trust nothing more
                    self.free.append(asked_slot)
                    self.stop()
                    return False
                if count < 0 or seq <= int(self.counters[_TAKEN]) or seq in self.stolen:
                    self.free.append(slot)  # skipped, failed, or decoded by the parent meanwhile
                else:
                    self.ready[seq] = (slot, count)
            timeout = 0.0  # after the first answers: only what is already there
        return True

    def stop(self) -> None:
        """End the child and wait for it (killed if it does not end within a second). Answers
        not taken are dropped: the caller decodes from now on."""
        if not self.alive:
            return
        pid, self.pid = self.pid, 0
        self.free.extend(slot for _, slot in self.pending)
        self.free.extend(slot for slot, _ in self.ready.values())
        self.pending.clear()
        self.ready.clear()
        self.stolen.clear()
        os.close(self.requests)  # the child reads EOF and exits
        try:
            for _ in range(100):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
                select.select([], [], [], 0.01)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        except ChildProcessError:  # already reaped
            pass
        finally:
            os.close(self.replies)

    def close(self) -> None:
        """Stop the child and unmap the slots, unless a weight the pass still holds views one:
        then the mapping goes when the last such array does."""
        self.stop()
        self._reclaim()
        self.lent.clear()
        del self.counters  # the mapping cannot close while an array views it
        with suppress(BufferError):  # a lent slot still viewed: unmapped with its last array
            self.shared.close()


def _child_main(
    store: Any, shared: mmap.mmap, header_bytes: int, slot_values: int, requests: int, replies: int
) -> None:
    """The child's whole life: answer requests until the pipe closes, then `os._exit`."""
    code = 1
    try:
        # No cyclic collection here: a garbage cycle inherited from the parent (a file object,
        # say) must not be finalized in the child, where its descriptor number may be reused.
        gc.disable()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        _close_inherited(requests, replies)
        _fresh_chunk_pool()
        _keep_freed_memory()
        counters = np.frombuffer(shared, dtype=np.int64, count=header_bytes // 8)
        slots = np.frombuffer(shared, dtype=np.float32, offset=header_bytes)
        reader = os.fdopen(requests, "rb")
        while header := reader.read(_REQUEST.size):
            if len(header) < _REQUEST.size:
                break
            seq, slot, start, stop, length = _REQUEST.unpack(header)
            name = reader.read(length).decode("utf-8")
            count = _SKIPPED
            # the parent has not passed it, nor taken it back to decode itself
            if seq > counters[_TAKEN] and counters[2 + slot] != seq:
                counters[_STARTED] = seq
                item = (name, start, stop)
                count = _decode_into(store, item, slots, slot * slot_values, slot_values)
            os.write(replies, _REPLY.pack(seq, slot, count))
        code = 0
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _decode_into(store: Any, item: Item, slots: np.ndarray, at: int, room: int) -> int:
    """Decode `item` into slots[at : at + its size]: its size, or _FAILED."""
    try:
        value = np.ascontiguousarray(decode_item(store, item), dtype=np.float32).reshape(-1)
    except Exception:  # the parent decodes it again and reports the error itself
        return _FAILED
    if value.size > room:
        return _FAILED
    slots[at : at + value.size] = value
    return value.size


def _close_inherited(*keep: int) -> None:
    """Close every descriptor but `keep` (os.closerange uses close_range(2)); stdin, stdout
    and stderr become /dev/null (a reader of the parent's output sees its end when the parent
    ends, and nothing of the child's can ever reach it)."""
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        if std != null:
            os.dup2(null, std)
    if null > 2:
        os.close(null)
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _MAX_FD)


_MAX_FD = 1 << 20
"""Where the child stops closing (Linux's default hard limit on descriptors); CPython closes a
range with one close_range(2) call where the kernel has it, or walks /proc/self/fd."""


CHILD_MMAP_THRESHOLD = 64 << 20
"""The child's glibc malloc serves requests below this from its heap, and keeps up to twice as
much freed there (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD). Each decode allocates its output and
temporaries afresh; mmapped and returned on every free, their pages were faulted in again for
every matrix: measured in one process, SmolLM2's 210 layer matrices decoded and copied into a
slot in 0.54 s with glibc's defaults, 0.38 s with these (min of 4). The child lives for one
pass and holds only a few items at once, so the freed memory it keeps stays small."""


def _keep_freed_memory() -> None:
    """Set CHILD_MMAP_THRESHOLD in this (child) process where the C library is glibc."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt  # glibc only: musl has no mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(CHILD_MMAP_THRESHOLD))
    mallopt(ctypes.c_int(m_trim_threshold), ctypes.c_int(2 * CHILD_MMAP_THRESHOLD))


def _fresh_chunk_pool() -> None:
    """engine.parallel's pool threads do not exist in a child, and its locks may have been held
    by another thread at the fork: decode on this thread only, with new state."""
    import threading

    from engine import parallel

    parallel.PARALLEL_THREADS = 1
    parallel._pool, parallel._pool_size, parallel._busy_workers = None, 0, 0
    parallel._pool_lock, parallel._busy_lock = threading.Lock(), threading.Lock()
