"""A process-wide budget of mail bytes in flight, so concurrent syncs and sends share one bound.

Each sync batch and each send holds its message bytes several times over while it runs (a sync
batch about 3x, measured; a send more). One task's memory is bounded by its batch or message
size, but a threads worker runs many tasks at once under one MemoryMax: twenty syncs of 8 MiB
batches, or a few sends of 25 MiB messages, would get the whole process OOM-killed, and every
task in flight with it. A reservation of the bytes a task is about to load makes it wait until
they fit instead:

    with budget_for(settings.mail_memory_budget).reserve(nbytes):
        ...load, use and drop the message bytes...

Reservations are served in arrival order (a large one is not starved by a stream of small ones).
One larger than the whole budget is capped at the budget: it waits until nothing else is held,
then runs alone, so a single max-size message always goes through and a lone holder never waits
on itself. Nested reservations in one thread could wait on each other: take one per task.

The bytes a task drops must also leave the process. glibc raises its mmap threshold each time a
large block is freed (up to 32 MiB), so after the first message the buffers of the next ones
come from the heap, where they fragment and stay: a sync of 24 messages of 1.5 MiB peaked
5 MiB higher for nothing but the order of its frees. The first budget fixes the threshold at
glibc's initial 128 KiB (mallopt M_MMAP_THRESHOLD, which also ends the raising): a message
buffer is its own mapping, returned to the system when freed.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class MemoryBudget:
    """A counting semaphore of bytes (threading.Condition), with a high-water mark."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a memory budget needs at least one byte, got {capacity}")
        self.capacity = capacity
        self._in_use = 0
        self._high_water = 0
        self._waiting: collections.deque[object] = collections.deque()
        self._condition = threading.Condition()

    @property
    def in_use(self) -> int:
        """Bytes reserved right now."""
        with self._condition:
            return self._in_use

    @property
    def waiting(self) -> int:
        """Reservations waiting for bytes right now."""
        with self._condition:
            return len(self._waiting)

    @property
    def high_water(self) -> int:
        """The most bytes ever reserved at once (for tests and diagnostics)."""
        with self._condition:
            return self._high_water

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[int]:
        """Wait until `nbytes` fit (capped at the capacity), hold them, release them on exit.

        Yields the bytes actually reserved.
        """
        if nbytes < 0:
            raise ValueError(f"cannot reserve a negative number of bytes ({nbytes})")
        held = min(nbytes, self.capacity)
        self._acquire(held)
        try:
            yield held
        finally:
            self._release(held)

    def _acquire(self, nbytes: int) -> None:
        ticket = object()
        with self._condition:
            self._waiting.append(ticket)
            try:
                self._condition.wait_for(
                    lambda: self._waiting[0] is ticket and self._in_use + nbytes <= self.capacity
                )
            except BaseException:  # interrupted while waiting: let the next one in line go
                self._waiting.remove(ticket)
                self._condition.notify_all()
                raise
            self._waiting.popleft()
            self._in_use += nbytes
            self._high_water = max(self._high_water, self._in_use)
            self._condition.notify_all()  # the next in line may fit too

    def _release(self, nbytes: int) -> None:
        with self._condition:
            self._in_use -= nbytes
            self._condition.notify_all()


_budgets: dict[int, MemoryBudget] = {}
_budgets_lock = threading.Lock()
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024


def fix_mmap_threshold() -> bool:
    """Blocks of MMAP_THRESHOLD bytes and more are mapped, and unmapped when freed (see the
    module docstring); False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # no libc found, or one without mallopt
        return False


def budget_for(capacity: int) -> MemoryBudget:
    """The process's budget of `capacity` bytes (MAILWORKER_MAIL_MEMORY_BUDGET), made on first use.

    A worker process has one setting, hence one budget shared by all its threads; a process
    that loads settings with different budgets (tests) gets one budget per size.
    """
    with _budgets_lock:
        if not _budgets:
            fix_mmap_threshold()
        budget = _budgets.get(capacity)
        if budget is None:
            budget = _budgets[capacity] = MemoryBudget(capacity)
        return budget
