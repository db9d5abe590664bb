"""Run independent per-layer work on a few threads and hand the results back in input order.

numpy and LAPACK release the GIL, so threads overlap the SVDs without copying the memory-mapped
weights into worker processes. Results come back in input order whatever finishes first, so what
is written does not depend on `jobs`. At most `jobs` items are in flight (running, or finished and
waiting for their turn), and together no more than `budget_bytes` of estimated working set; an
item larger than the budget runs alone.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Working set allowed in flight across jobs. With the process's own ~200 MB this keeps a run near
# the 1 GB target of the scale benchmark (README, Scale).
DEFAULT_BUDGET_BYTES = 512 << 20


def ordered_map(func: Callable[[T], R], items: Iterable[T], jobs: int = 1,
                cost: Callable[[T], int] | None = None, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> Iterator[R]:
    """func(item) for each item, in input order; up to `jobs` at once within `budget_bytes`.

    Close the iterator (contextlib.closing) when stopping early: that cancels what has not
    started and waits for what is running.
    """
    if jobs <= 1:
        for item in items:
            yield func(item)
        return
    pending: collections.deque[tuple[Future[Any], int]] = collections.deque()
    in_flight = 0
    executor = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="onnxlr")
    try:
        for item in items:
            weight = cost(item) if cost is not None else 0
            # Hand back the oldest results until this item fits: memory is freed in input order.
            while pending and (len(pending) >= jobs or in_flight + weight > budget_bytes):
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
