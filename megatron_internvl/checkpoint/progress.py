"""Progress of a long conversion, in bytes written: a tqdm bar when stderr is a terminal, else a
log line at every tenth (so batch-job logs show it too)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType

from tqdm import tqdm

GiB = 2**30
_UNITS = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B"))


def _unit(nbytes: int) -> tuple[int, str, int]:
    """(scale, name, decimals) that suit `nbytes` (MiB for 40 MiB, not "0.04 GiB")."""
    scale, unit = next((s, u) for s, u in _UNITS if nbytes >= s or s == 1)
    return scale, unit, 0 if scale == 1 else 2 if nbytes / scale < 10 else 1


def amount(nbytes: int) -> str:
    """ "1.75 GiB", "40.0 MiB", "512 B"."""
    scale, unit, digits = _unit(nbytes)
    return f"{nbytes / scale:.{digits}f} {unit}"


def sizes(done: int, total: int) -> str:
    """ "0.70 of 1.75 GiB", both in the unit that suits `total`."""
    scale, unit, digits = _unit(total)
    return f"{done / scale:.{digits}f} of {total / scale:.{digits}f} {unit}"


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
                f"{self._what}: {10 * self._tenths:3d}% ({sizes(self.done, self.total)}, "
                f"{seconds:.0f} s)"
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
