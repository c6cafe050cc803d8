"""The two kinds of data problems: a whole data configuration that cannot work (`DataError`,
stop and tell the user) and one sample that cannot be used (`BadSampleError`, skip and count)."""

from __future__ import annotations


class DataError(ValueError):
    """The data configuration cannot work (no such directory, no shards, no index, ...).

    Its message is one line that says what was found and what to do; entry points print it
    without a traceback.
    """


class BadSampleError(ValueError):
    """One sample cannot be used; `reason` is a short tag for counters, the message says why."""

    def __init__(self, key: str, reason: str, detail: str) -> None:
        super().__init__(f"sample {key}: {reason}: {detail}")
        self.key = key
        self.reason = reason
        self.detail = detail
