"""Run independent per-layer work on a few threads and hand the results back in input order.

numpy and LAPACK release the GIL, so threads overlap the SVDs without copying the memory-mapped
weights into worker processes. Results come back in input order whatever finishes first, so what
is written does not depend on `jobs`. At most `jobs` items run at once, and at most LOOKAHEAD x `jobs` are in
flight (running, queued, or finished and waiting for their turn), together no more than `budget_bytes` of
estimated working set (default: 640 MB per job, at most a quarter of the memory available, at least
512 MB); an item larger than the budget runs alone.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from onnxlr.verification import memory

T = TypeVar("T")
R = TypeVar("R")

# Working set allowed in flight across jobs: at least this much (an item larger than the budget runs alone) ...
DEFAULT_BUDGET_BYTES = 512 << 20
# ... up to this much per job (a 4096 x 14336 randomized SVD, an 8B model's MLP weight, is estimated at 567 MB,
# so two jobs run two of them at once, as the SVD floor does) ...
JOB_BUDGET_BYTES = 640 << 20
# ... and never more than this share of the memory available.
AVAILABLE_SHARE = 0.25
# Items in flight per job: while a long item runs, the shorter ones after it keep the other threads busy and
# wait for their turn (a queue of `jobs` alone left a core idle behind each 8B MLP SVD).
LOOKAHEAD = 4


def working_set_budget(jobs: int) -> int:
    """Bytes of estimated working set allowed in flight: JOB_BUDGET_BYTES per job, at most a quarter of the memory
    available (onnxlr.verification.memory.available, so $ONNXLR_MEMORY_LIMIT lowers it), never below DEFAULT_BUDGET_BYTES."""
    budget = jobs * JOB_BUDGET_BYTES
    free = memory.available()
    if free is not None:
        budget = min(budget, int(AVAILABLE_SHARE * free.bytes))
    return max(DEFAULT_BUDGET_BYTES, budget)


def ordered_map(func: Callable[[T], R], items: Iterable[T], jobs: int = 1,
                cost: Callable[[T], int] | None = None, budget_bytes: int | None = None) -> Iterator[R]:
    """func(item) for each item, in input order; up to `jobs` at once within `budget_bytes`.

    Close the iterator (contextlib.closing) when stopping early: that cancels what has not
    started and waits for what is running.
    """
    if jobs <= 1:
        for item in items:
            yield func(item)
        return
    if budget_bytes is None:
        budget_bytes = working_set_budget(jobs)
    pending: collections.deque[tuple[Future[Any], int]] = collections.deque()
    in_flight = 0
    executor = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="onnxlr")
    try:
        for item in items:
            weight = cost(item) if cost is not None else 0
            # Hand back the oldest results when ready, and until this item fits: memory is freed in input order.
            while pending and (pending[0][0].done() or len(pending) >= LOOKAHEAD * jobs
                               or in_flight + weight > budget_bytes):
                future, done_weight = pending.popleft()
                in_flight -= done_weight
                yield future.result()
            pending.append((executor.submit(func, item), weight))
            in_flight += weight
        while pending:
            future, _ = pending.popleft()
            yield future.result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
