"""Decode ahead: run a loader over items in a thread pool, a bounded window ahead of the consumer."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetched(pool: ThreadPoolExecutor, items: Iterable[T], load: Callable[[T], R], window: int,
               catch: type[BaseException] | tuple[type[BaseException], ...] = ()) -> Iterator[tuple[T, R | BaseException]]:
    """``(item, load(item))`` in order, with at most ``window`` loads submitted ahead.

    An exception of a type in ``catch`` comes back in place of the result; any other is raised.
    """
    pending: deque[tuple[T, Future]] = deque()
    it = iter(items)

    def fill() -> None:
        while len(pending) < max(1, window):
            item = next(it, _END)
            if item is _END:
                return
            pending.append((item, pool.submit(load, item)))

    fill()
    while pending:
        item, fut = pending.popleft()
        try:
            result = fut.result()
        except catch as e:  # type: ignore[misc]
            result = e
        fill()
        yield item, result


def batched(pairs: Iterator, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` (the last may be shorter)."""
    batch = []
    for pair in pairs:
        batch.append(pair)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


_END = object()
