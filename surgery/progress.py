"""Progress of long work on stderr: one bar over a job's steps, bars over long loops.

On when stderr is a terminal; ``SURGERY_PROGRESS=1`` forces it on (a log file, CI) and
``0`` off; the CLI's ``-q`` turns it off (:func:`set_enabled`). Off, nothing is imported
or printed. The steps' durations are kept either way: reports state where the time went.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

TICK_SECONDS = 0.5  # the running step's clock refreshes this often

_forced: bool | None = None


def set_enabled(on: bool | None) -> None:
    """Force progress on or off (None: decide from SURGERY_PROGRESS, then whether stderr is a terminal)."""
    global _forced
    _forced = on


def enabled() -> bool:
    if _forced is not None:
        return _forced
    env = os.environ.get("SURGERY_PROGRESS", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return sys.stderr.isatty()


def _tqdm(**kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, file=sys.stderr, **kwargs)


def bar(iterable: Iterable, desc: str, *, total: int | None = None, unit: str = "it") -> Iterable:
    """``iterable`` with a bar (count, rate, ETA) while progress is on; the iterable itself when off."""
    if not enabled():
        return iterable
    return _tqdm(iterable=iterable, desc=desc, total=total, unit=unit, leave=False)


class Steps:
    """A bar over the named steps of one job; the running step's name and clock tick while it runs.

    ``timings`` holds (step, seconds) for every finished step, with progress on or off.
    """

    def __init__(self, desc: str, total: int) -> None:
        self.timings: list[tuple[str, float]] = []
        # mininterval 0: a handful of updates, each one drawn (tqdm would skip those 0.1 s apart)
        self._bar = _tqdm(total=total, desc=desc, unit="step", leave=False, mininterval=0,
                          bar_format="{desc}: {n_fmt}/{total_fmt} steps |{bar}| {elapsed}<{remaining} {postfix}",
                          ) if enabled() else None

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        stop = threading.Event()
        ticker = None
        if self._bar is not None:
            self._bar.set_postfix_str(name)
            ticker = threading.Thread(target=self._tick, args=(name, start, stop), daemon=True)
            ticker.start()
        try:
            yield
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
            self.timings.append((name, round(time.perf_counter() - start, 3)))
            if self._bar is not None:
                self._bar.update(1)

    def _tick(self, name: str, start: float, stop: threading.Event) -> None:
        while not stop.wait(TICK_SECONDS):
            self._bar.set_postfix_str(f"{name} {time.perf_counter() - start:.0f}s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
