"""Lines of a child process's output as they arrive, read by a thread so every wait is
bounded (a blocking readline would hang the test if the child went quiet)."""

from __future__ import annotations

import queue
import threading
import time
from typing import IO


class Lines:
    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def _next(self, deadline: float, waiting_for: str) -> str | None:
        """The next line (None: the stream ended), failing once ``deadline`` passes."""
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"{waiting_for}: {self.seen}"
            try:
                return self._queue.get(timeout=left)
            except queue.Empty:
                continue

    def until(self, needle: str, timeout: float = 30) -> list[str]:
        """Every line so far, once one contains ``needle``; fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not any(needle in line for line in self.seen):
            line = self._next(deadline, f"{needle!r} not seen")
            assert line is not None, f"stream ended before {needle!r}: {self.seen}"
            self.seen.append(line)
        return self.seen

    def rest(self, timeout: float = 30) -> list[str]:
        """Every line, once the stream has ended; fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while (line := self._next(deadline, "the stream did not end")) is not None:
            self.seen.append(line)
        return self.seen
