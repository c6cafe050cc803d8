"""Background prefetching for a stateful loader, without losing exact resume.

`Prefetcher` runs the loader in a thread, `depth` micro-batches ahead of the training loop, so
reading, DALI work (which releases the GIL) and tokenization overlap the step. The loader's
own state runs ahead of what training consumed, so the thread snapshots `state_dict()` right
after producing each micro-batch and queues it with the batch; `Prefetcher.state_dict()` is the
snapshot of the last batch handed out. Resuming from it yields exactly the batches that were
not consumed, prefetched or not.

A loader with `next_rows()` and a `collate(rows)` safe on another thread (`InternVLLoader`)
gets a second thread for `collate`: the float images of one micro-batch (~1 ms per tile on a
CPU, mostly page faults of the fresh tensor) are built while the first thread tiles the next
samples.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Protocol


class StatefulLoader(Protocol):
    """What `Prefetcher` needs: an iterator with `state_dict` / `load_state_dict`."""

    def __next__(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher:
    """Iterates `loader` in a background thread, up to `depth` micro-batches ahead."""

    def __init__(self, loader: StatefulLoader, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch: depth must be >= 1, got {depth}")
        self.loader = loader
        self.depth = depth
        self._split = callable(getattr(loader, "next_rows", None)) and callable(
            getattr(loader, "collate", None)
        )
        # Room for a whole fill's rows (uint8 tiles, <= ~28 MB a row at 448 px), so tiling goes
        # on while they are collated: a fill yields several micro-batches at once (measured: with
        # room for one, the tiler waited on collate and 2 cores ran at 1.6).
        self._rows: queue.Queue = queue.Queue(maxsize=8)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._state = loader.state_dict()

    def _work(self) -> None:
        loader: Any = self.loader
        out = self._rows if self._split else self._queue
        try:
            while not self._stop.is_set():
                item = loader.next_rows() if self._split else next(loader)
                self._put(out, (item, loader.state_dict()))
        except BaseException as error:  # handed to the consumer, raised there
            self._put(out, _Failure(error))

    def _collate(self) -> None:
        loader: Any = self.loader
        while not self._stop.is_set():
            try:
                item = self._rows.get(timeout=0.1)
            except queue.Empty:
                continue
            if not isinstance(item, _Failure):
                try:
                    item = (loader.collate(item[0]), item[1])
                except BaseException as error:
                    item = _Failure(error)
            self._put(self._queue, item)
            if isinstance(item, _Failure):
                return

    def _put(self, out: queue.Queue, item: Any) -> None:
        while not self._stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if not self._threads:
            targets = [self._work, self._collate] if self._split else [self._work]
            for i, target in enumerate(targets):
                thread = threading.Thread(target=target, name=f"prefetch{i}", daemon=True)
                thread.start()
                self._threads.append(thread)
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        batch, self._state = item
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The loader's state right after the last micro-batch handed out."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loader; only before the first `next`."""
        if self._threads:
            raise RuntimeError(
                "prefetch: load_state_dict after iteration started; build a new Prefetcher"
            )
        self.loader.load_state_dict(state)
        self._state = copy.deepcopy(state)

    def close(self) -> None:
        """Stop the threads (each finishes the micro-batch it is working on)."""
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
