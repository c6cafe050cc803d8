"""Progress of a long conversion, in bytes written: a tqdm bar when stderr is a terminal, else a
log line at every tenth (so batch-job logs show it too)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType

from tqdm import tqdm

GiB = 2**30


class Progress:
    """Counts bytes towards `total`; `bar=None` picks the bar on a terminal, lines otherwise."""

    def __init__(
        self, total: int, what: str, log: Callable[[str], None], bar: bool | None = None
    ) -> None:
        self.total = max(total, 1)
        self.done = 0
        self._what = what
        self._log = log
        self._tenths = 0
        self._start = time.perf_counter()
        use_bar = sys.stderr.isatty() if bar is None else bar
        self._bar = (
            tqdm(
                total=total,
                desc=what,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                dynamic_ncols=True,
            )
            if use_bar
            else None
        )

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
            return
        while self._tenths < 10 and self.done * 10 >= (self._tenths + 1) * self.total:
            self._tenths += 1
            seconds = time.perf_counter() - self._start
            self._log(
                f"{self._what}: {10 * self._tenths:3d}% ({self.done / GiB:.2f} of "
                f"{self.total / GiB:.2f} GiB, {seconds:.0f} s)"
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
