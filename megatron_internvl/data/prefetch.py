"""Background prefetching for a stateful loader, without losing exact resume.

`Prefetcher` runs the loader in a thread, `depth` micro-batches ahead of the training loop, so
reading, DALI work (which releases the GIL) and tokenization overlap the step. The loader's
own state runs ahead of what training consumed, so the thread snapshots `state_dict()` right
after producing each micro-batch and queues it with the batch; `Prefetcher.state_dict()` is the
snapshot of the last batch handed out. Resuming from it yields exactly the batches that were
not consumed, prefetched or not.
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
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = loader.state_dict()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                item: Any = (next(self.loader), self.loader.state_dict())
                self._put(item)
        except BaseException as error:  # handed to the consumer, raised there
            self._put(_Failure(error))

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="prefetch", daemon=True)
            self._thread.start()
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
        if self._thread is not None:
            raise RuntimeError(
                "prefetch: load_state_dict after iteration started; build a new Prefetcher"
            )
        self.loader.load_state_dict(state)
        self._state = copy.deepcopy(state)

    def close(self) -> None:
        """Stop the thread (it finishes the micro-batch it is working on)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
