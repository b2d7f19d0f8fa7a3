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

    def until(self, needle: str, timeout: float = 30) -> list[str]:
        """Every line so far, once one contains ``needle``; fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not any(needle in line for line in self.seen):
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} not seen in {self.seen}"
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            assert line is not None, f"stream ended before {needle!r}: {self.seen}"
            self.seen.append(line)
        return self.seen

    def rest(self, timeout: float = 30) -> list[str]:
        """Every line, once the stream has ended; fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the stream did not end: {self.seen}"
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                return self.seen
            self.seen.append(line)
