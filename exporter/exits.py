"""Exit statuses and the one-line failures every command shares (docs: README "Exit status").

A command never ends in a traceback: a usage, configuration or address problem is one
``error: ...`` line and status 2; Ctrl-C is one ``interrupted`` line and 130; a reader that
closed the pipe early (``history | head``) ends the command quietly with 141, the status a
shell reports for tools that die of SIGPIPE.
"""

from __future__ import annotations

import errno
import os
import select
import sys
import threading
from collections.abc import Callable
from typing import Final, TextIO

import anyio.to_thread

EXIT_OK: Final = 0  # probe, loadtest: caching works
# The command could not do its job (the store cannot be opened); probe, loadtest: caching
# does not work.
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2  # bad arguments or configuration, or the listen address is taken
EXIT_NO_VERDICT: Final = 3  # probe, loadtest: no cache fields reported, or requests failed
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE: Final = 141  # 128 + SIGPIPE

# How long a failed start waits for worker threads to end (see join_threads_started_since).
_THREAD_JOIN_SECONDS: Final = 2.0

_LISTEN_HINTS: Final = {
    errno.EADDRINUSE: "address already in use: another process listens there",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "address not available: no interface of this machine has it",
}


def listen_error(host: str, port: int, exc: OSError) -> str:
    """``cannot listen on HOST:PORT: <reason>``, the reason in words a new user acts on."""
    shown = f"[{host}]" if ":" in host else host
    reason = _LISTEN_HINTS.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()
    return f"cannot listen on {shown}:{port}: {reason}"


def is_broken_pipe(exc: BaseException) -> bool:
    """A BrokenPipeError, or a group of nothing else (raised inside a task group)."""
    if isinstance(exc, BrokenPipeError):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(is_broken_pipe(inner) for inner in exc.exceptions)
    return False


def reader_gone(stream: TextIO) -> bool:
    """Whether ``stream`` is a pipe whose reader has already closed it, checked without
    writing: a command whose output comes only at the end (``loadtest``) then spends nothing.
    """
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no descriptor (tests' StringIO), no poll
        return False


def silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (embedded, tests): nothing to protect
        pass


def run_command(command: Callable[[], int], *, err: TextIO | None = None) -> int:
    """Run a command's body, turning Ctrl-C and a closed stdout into their exit statuses."""
    try:
        status = command()
        sys.stdout.flush()  # a broken pipe shows here for output still buffered
        return status
    except KeyboardInterrupt:
        print("interrupted", file=err or sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as exc:
        if not is_broken_pipe(exc):
            raise
        silence_stdout()
        return EXIT_BROKEN_PIPE


async def join_threads_started_since(before: set[threading.Thread]) -> None:
    """Wait (bounded) for the threads started since ``before`` to end, after a failed start.

    aiosqlite queues the stop of its worker thread when a connection fails to open but does
    not wait for it; returning at once closes the event loop under that thread, which then
    prints "RuntimeError: Event loop is closed" after the command's one-line error.
    """
    new = [t for t in threading.enumerate() if t not in before and not t.daemon]

    def join() -> None:
        for thread in new:
            thread.join(_THREAD_JOIN_SECONDS / len(new))

    if new:
        await anyio.to_thread.run_sync(join)
