"""Decode the next weights while the current ones are used: in a forked child process.

A traced pass asks for weights in the same order in every layer (norm, q, k, v, o, norm, gate,
up, down), then for the lm_head a row block at a time. `WeightPrefetcher` learns the layer
order from layer 0 (keyed with the layer number replaced) and is told the head's blocks; from
layer 1 on, a child process (engine.decoder_process) decodes the matrices and head blocks that
come next, a few ahead, while the pass computes and writes. Each is still the store's own
`get` / `get_rows`, bit for bit (the child runs the same code on the same memory map); the pass
decodes itself whatever the child has not begun, so a slow child or a wrong guess costs the
child's wasted work and nothing else. Vectors (norms) are decoded inline (a round trip costs
more than they do), and so are matrices and head blocks of PARALLEL_DECODE_MIN_VALUES or more:
those are shared among threads already.

When: only for a model with enough to decode (DECODE_PROCESS_MIN_VALUES), only on the numpy
path, never in a comparison (its local error has the second core), and only when, while the
command started, a core stayed idle and the host took little (`idle_core`).

What it buys, measured on the 2-core development VM (SmolLM2, 37-token chat prompt, every
stage traced to tmpfs): in-process, quiet host, min of 7, 1.01 s a trace decoding inline, 0.65 s
with every weight free, 0.68 s with every weight a copy of a decoded one; with the child
0.74-0.86 s. Whole process (min of 6-12 interleaved runs, host steal 1-9%), with the child
against without: 0.86 vs 1.10 s, 0.91 vs 1.03 s, 1.09 vs 1.18 s, 1.08 vs 0.93 s: a gain when
the second core is really idle, of the order of this VM's noise when its host is busy. On a
machine with idle cores the pass is left only the matmuls, norms and writes.

Memory: DECODE_SLOTS shared slots of the largest item, within DECODE_SHARED_BYTES (SmolLM2: 8
slots of its 9 MiB head block), and the child's own decoding temporaries: bounded whatever the
number of layers or tokens (a 7B model's largest matrix is over the budget alone: two slots).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.decoder_process import DecoderProcess, Item, decode_item
from engine.formats.quant import PARALLEL_DECODE_MIN_VALUES

DECODE_PROCESS = hasattr(os, "fork")
"""Whether a pass may fork a decoding child (POSIX). Set False to decode every weight inline."""

DECODE_PROCESS_MIN_VALUES = 16 << 20
"""Values left to decode (after layer 0) from which a pass forks a child: ~30 ms of decoding,
far above a fork and the pipes (~2 ms); test-sized models decode inline. SmolLM2: 29 layers x
3.5 Mi values, and its 28 Mi-value head."""

DECODE_SLOTS = 8
"""Weights the child may decode ahead of the pass. Over a whole layer the child decodes faster
than the pass computes, but not evenly: the three big FFN matrices come last and are used
quickly, so with few slots the child is still at gate or up when the pass wants down, and the
pass decodes it itself. Measured on SmolLM2 (whole-process trace, 2-core VM, interleaved runs,
host steal 15-16%): with 3 slots (32 MiB) the pass took 48 of the child's items back, 23-26 of
them the down matrices, with 8 slots 16, mostly head blocks; wall min 0.82-0.89 s / median
1.03-1.08 s with 8 slots against 0.92-1.10 / 1.22-1.30 with 3 (7-8 rounds each; 6 slots in
between)."""

DECODE_SHARED_BYTES = 80 << 20
"""The most shared memory the slots take: fewer slots (never under two) where DECODE_SLOTS of
the largest item would take more (SmolLM2: a 4096-row head block is 9 MiB, so eight slots,
72 MiB)."""

DECODE_PATIENT = False
"""Tests set it True: the pass then waits for every item the child was asked for
(engine.decoder_process.DecoderProcess `patient`), so that the child provably delivers them."""

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

EXPERT = ".mlp.experts."
"""Mixture-of-experts weights are decoded only when a token routes to their expert (issue 12's
guarantee), so they are never predicted: which expert comes next is the router's answer."""

WHOLE = -1
"""An Item's start and stop when it is the whole tensor."""


def item_of(name: str) -> Item:
    """The Item for the whole tensor `name`."""
    return (name, WHOLE, WHOLE)


def _split(name: str) -> tuple[int, str] | None:
    match = _LAYER.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


CpuTimes = tuple[int, int, int]
"""(all, idle, stolen) clock ticks of every CPU since boot, from /proc/stat's first line."""


def cpu_times() -> CpuTimes | None:
    """This machine's CPU times now, or None where /proc/stat is not there (not Linux)."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    # user nice system idle iowait irq softirq steal
    return sum(fields), fields[3] + fields[4], fields[7]


MIN_WINDOW_TICKS = 20
"""Clock ticks (of all CPUs together; 10 ms each on Linux) below which a window of /proc/stat
says nothing (one tick of steal would be 5%)."""

MAX_STEAL_SHARE = 0.05
"""The most CPU time the host may have taken from this virtual machine while the pass started
for a child to be worth it. Measured on the 2-core development VM (whole-process trace of
SmolLM2, min of 6 interleaved runs): with 1-4% stolen the child took the trace from 1.10 s to
0.86 s; with 12% stolen it made it slower, 1.40 s to 1.60 s: the host's other guests take the
'idle' core's time, and the child then only takes turns with the pass."""

MIN_IDLE_SHARE = 0.3
"""The least idle share of all CPU time while the pass started for a core to count as free
(the pass itself keeps one core busy: on 2 cores an idle second core is ~50%)."""


def idle_core(since: CpuTimes | None = None, now: CpuTimes | None = None) -> bool:
    """Whether a core is likely free for the child: CPU time stayed idle and the host took
    little of it between `since` and `now` (/proc/stat samples), else when that window is too
    short to tell, the one-minute load average below the usable cores less one half. With a
    busy process beside the pass the child would only take turns with it (measured, 2 cores,
    one busy neighbour: 1.39 s against 1.23 s decoding inline)."""
    if since is not None and now is not None and now[0] - since[0] >= MIN_WINDOW_TICKS:
        ticks = now[0] - since[0]
        idle, stolen = (now[1] - since[1]) / ticks, (now[2] - since[2]) / ticks
        return idle >= MIN_IDLE_SHARE and stolen <= MAX_STEAL_SHARE
    try:
        cores = len(os.sched_getaffinity(0))
        return os.getloadavg()[0] < cores - 0.5
    except (AttributeError, OSError):
        return False


PROCESS_START = cpu_times()
"""/proc/stat when this module was imported (early in a command, before the model is opened):
the start of the window `idle_core` looks at."""


class WeightPrefetcher:
    """`get(name)` and `rows(name, start, stop)` of a WeightStore, with the pass's next matrices
    decoded ahead in a child process.

    `num_layers`: the layers the pass will run; `tail`: the row blocks it will ask for after
    them (the lm_head, engine.forward.lm_head_row_blocks), predicted as well; `child`: False
    to decode everything inline."""

    def __init__(
        self, store: Any, num_layers: int, tail: Sequence[Item] = (), *, child: bool = True
    ) -> None:
        self.store = store
        self.child = child
        self.num_layers = num_layers
        self.tail = list(tail)
        self.order: list[str] = []  # per-layer matrix keys in the order layer 0 asked for them
        self.learned = False
        self.schedule: dict[Item, int] = {}  # what the child may decode, in the pass's order
        self.planned: list[Item] = []
        self.cursor = 0  # the next planned item to request
        self.decoder: DecoderProcess | None = None

    def get(self, name: str) -> np.ndarray:
        value = self._fetch(item_of(name))
        split = _split(name)
        if split is not None and not self.learned:
            self._learn(*split)
        self._request_ahead()
        return value

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        value = self._fetch((name, start, stop))
        self._request_ahead()
        return value

    # -- the plan -------------------------------------------------------------------------

    def _learn(self, layer: int, key: str) -> None:
        if layer == 0:
            name = f"model.layers.0.{key}"
            if key not in self.order and EXPERT not in name and self._offloadable(item_of(name)):
                self.order.append(key)
            return
        self.learned = True  # layer 1 reached: layer 0's order is complete
        self.planned = [
            item_of(f"model.layers.{later}.{key}")
            for later in range(1, self.num_layers)
            for key in self.order
            if self.store.has(f"model.layers.{later}.{key}")
        ] + [item for item in self.tail if self._offloadable(item)]
        self.schedule = {item: index for index, item in enumerate(self.planned)}
        current = item_of(f"model.layers.{layer}.{key}")
        self.cursor = self.schedule.get(current, -1) + 1
        if (
            self.child
            and DECODE_PROCESS
            and self.order
            and self._worth_a_child()
            and idle_core(PROCESS_START, cpu_times())
        ):
            self.decoder = self._start_decoder()

    def _values(self, item: Item) -> int:
        return int(np.prod(self._shape(item)))

    def _offloadable(self, item: Item) -> bool:
        """A matrix (or head row block) the pass would decode on its own thread: a bigger one
        is shared among threads already (quant.PARALLEL_DECODE_MIN_VALUES)."""
        return len(self._shape(item)) >= 2 and self._values(item) < PARALLEL_DECODE_MIN_VALUES

    def _worth_a_child(self) -> bool:
        return sum(self._values(item) for item in self.planned) >= DECODE_PROCESS_MIN_VALUES

    def _start_decoder(self) -> DecoderProcess | None:
        largest = 4 * max(self._values(item) for item in self.planned)
        slots = max(2, min(DECODE_SLOTS, DECODE_SHARED_BYTES // largest))
        store = getattr(self.store, "decoding_store", self.store)  # not a cache's lock
        try:
            return DecoderProcess(store, largest, slots, patient=DECODE_PATIENT)
        except OSError:  # no fork here (EAGAIN, ENOMEM): decode inline
            return None

    # -- the child ------------------------------------------------------------------------

    def _fetch(self, item: Item) -> np.ndarray:
        value = self._from_decoder(item)
        if value is None:
            return decode_item(self.store, item)
        adopt = getattr(self.store, "adopt", None)  # a cache keeps what it would have decoded
        return adopt(item[0], value) if adopt is not None and item[1] == WHOLE else value

    def _from_decoder(self, item: Item) -> np.ndarray | None:
        decoder = self.decoder
        position = self.schedule.get(item)
        if decoder is None or position is None:
            return None  # not planned (a norm, layer 0, an expert): decoded inline
        self.cursor = max(self.cursor, position + 1)  # a wrong guess: go on after `item`
        return decoder.take(position, self._shape(item), self._decode_planned)

    def _decode_planned(self, position: int) -> np.ndarray | None:
        """Planned item `position`, decoded here while the child is busy with an earlier one
        (DecoderProcess.take); None if that fails (it is decoded again, and fails, in its turn)."""
        try:
            return decode_item(self.store, self.planned[position])
        except Exception:
            return None

    def _shape(self, item: Item) -> tuple[int, ...]:
        name, start, stop = item
        shape = tuple(self.store.shape(name))
        return shape if start == WHOLE else (stop - start, *shape[1:])

    def _request_ahead(self) -> None:
        decoder = self.decoder
        if decoder is None:
            return
        while self.cursor < len(self.planned) and decoder.request(
            self.cursor, self.planned[self.cursor]
        ):
            self.cursor += 1

    def close(self) -> None:
        """Stop the child (the store may be closed next)."""
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None
