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


class LoadAhead:
    """:func:`prefetched` that runs on into what comes next: once every item of one :meth:`run` is
    submitted, the loads of its ``then`` items start (still within ``window``), and a later :meth:`run`
    picks up those already started. Loads started for items that run does not ask for are cancelled
    (one already running finishes and is dropped). Items must be hashable; one run at a time.
    """

    def __init__(self, pool: ThreadPoolExecutor, load: Callable[[T], R], window: int,
                 catch: type[BaseException] | tuple[type[BaseException], ...] = ()):
        self.pool, self.load, self.window, self.catch = pool, load, max(1, window), catch
        self._ahead: dict = {}  # item → Future, started for the next run

    def run(self, items: Iterable[T], then: Iterable[T] = ()) -> Iterator[tuple[T, R | BaseException]]:
        carried, self._ahead = self._ahead, {}
        pending: deque[tuple[T, Future]] = deque()
        it, nxt = iter(items), iter(then)
        exhausted = False

        def fill() -> None:
            nonlocal exhausted
            while not exhausted and len(pending) + len(self._ahead) < self.window:
                item = next(it, _END)
                if item is _END:
                    exhausted = True
                    break
                fut = carried.pop(item, None)
                pending.append((item, fut if fut is not None else self.pool.submit(self.load, item)))
            while exhausted and len(pending) + len(self._ahead) < self.window:
                item = next(nxt, _END)
                if item is _END:
                    return
                if item not in self._ahead:
                    self._ahead[item] = carried.pop(item, None) or self.pool.submit(self.load, item)

        try:
            fill()
            while pending:
                item, fut = pending.popleft()
                try:
                    result = fut.result()
                except self.catch as e:  # type: ignore[misc]
                    result = e
                fill()
                yield item, result
        finally:  # done, or the consumer gave up: nothing of this run is left loading
            for _, fut in pending:
                fut.cancel()
            for fut in carried.values():
                fut.cancel()

    def cancel(self) -> None:
        """Drop the loads started for the next run."""
        for fut in self._ahead.values():
            fut.cancel()
        self._ahead = {}


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
