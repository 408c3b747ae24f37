"""A daemon thread that runs one pass of background work every so many seconds: the
sweeper, the destination prober and the retention schedule inside `serve`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["PeriodicThread"]

log = logging.getLogger(__name__)


class PeriodicThread:
    """Calls ``work()`` every ``interval_s`` until stopped (first after one interval, or at
    once with ``run_first``). A pass that raises is logged and the schedule goes on."""

    def __init__(self, name: str, interval_s: float, work: Callable[[], object], *,
                 run_first: bool = False, join_s: float = 10) -> None:
        self._interval_s = interval_s
        self._work = work
        self._run_first = run_first
        self._join_s = join_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._join_s)

    def _run(self) -> None:
        if self._run_first:
            self._pass()
        while not self._stop.wait(self._interval_s):
            self._pass()

    def _pass(self) -> None:
        try:
            self._work()
        except Exception:
            log.exception("%s pass failed", self._thread.name)
