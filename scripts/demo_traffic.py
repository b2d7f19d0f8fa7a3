"""Sample traffic for the demo: two made-up applications send chat requests through the
exporter's pass-through proxy to the SIMULATOR (not a real provider; nothing is billed), so
the traffic rows of the dashboards and the "prompts changed" alert have something to show.

- ``support-bot`` (model ``sim-cache-ok``) keeps one system prompt, a fixed handbook, and
  asks a new question each time: its prefix is stable, its requests hit the cache, and the
  price table of examples/demo.toml turns the hits into savings.
- ``clock-agent`` (model ``sim-cache-blocks``) starts its system prompt with the current
  time, the classic mistake: every prefix is new (churn ~1), nothing hits, while the probes
  of the same model say caching works, so LLMCacheTrafficPromptsChanged fires.

The two take turns, one request every ``--interval`` seconds, at most ``--max-requests`` in
all. ``make demo`` runs this in a thread; ``python scripts/demo_traffic.py --proxy URL``
runs it alone (Ctrl-C stops it). tests/test_stack_e2e.py drives its stack with it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import httpx

INTERVAL_SECONDS = 10.0  # a few requests a minute
MAX_REQUESTS = 8640  # a day of them at the default interval
TIMEOUT_SECONDS = 30.0

# Over the 1,024-token minimum the simulated models cache from (and over the proxy's
# 4-characters-a-token estimate of it), so prefixes are hashed and can hit.
HANDBOOK = " ".join(
    f"Rule {n}: answer in plain words, cite section {n} of the handbook, and never guess."
    for n in range(1, 121)
)
QUESTIONS = (
    "How do I reset my password?",
    "Where is my invoice for last month?",
    "Can I change the e-mail address of my account?",
    "Why was my card declined?",
    "How do I cancel my plan?",
)


@dataclass(frozen=True)
class App:
    name: str
    model: str
    system: Callable[[int], str]


APPS = (
    App(
        "support-bot",
        "sim-cache-ok",
        lambda n: "You are the support assistant of Example Corp. " + HANDBOOK,
    ),
    App(
        "clock-agent",
        "sim-cache-blocks",
        # The time first: nothing after it can ever be read from the cache.
        lambda n: (
            f"Current time: {time.strftime('%Y-%m-%dT%H:%M:%S')} (request {n}). "
            "You are a coding agent. " + HANDBOOK
        ),
    ),
)


def request_body(app: App, n: int) -> dict[str, Any]:
    # Every other request streams, always asking for usage: a Venice-type proxy expects it
    # in every stream, and the simulator sends it only when asked.
    stream = n % 2 == 1
    body: dict[str, Any] = {
        "model": app.model,
        "messages": [
            {"role": "system", "content": app.system(n)},
            {"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]},
        ],
        "max_tokens": 16,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def send(client: httpx.Client, app: App, n: int) -> int:
    """One request through the proxy, read to the end as a client would; its status."""
    body = request_body(app, n)
    headers = {"user-agent": f"demo-traffic/{app.name}"}
    with client.stream("POST", "/chat/completions", json=body, headers=headers) as response:
        for _ in response.iter_bytes():
            pass
        return response.status_code


def run(
    proxy: str,
    stop: threading.Event,
    *,
    interval: float = INTERVAL_SECONDS,
    max_requests: int = MAX_REQUESTS,
    report: Callable[[str], None] = print,
) -> int:
    """Send the sample traffic until ``stop`` is set or ``max_requests`` were sent; the
    number of requests that did not get a 200. Failures are reported once each kind."""
    failed = 0
    seen: set[str] = set()
    with httpx.Client(base_url=proxy, timeout=TIMEOUT_SECONDS) as client:
        for count in range(max_requests):
            app = APPS[count % len(APPS)]
            n = count // len(APPS)
            try:
                status = send(client, app, n)
                problem = None if status == 200 else f"HTTP {status}"
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
            if problem is not None:
                failed += 1
                if problem not in seen:
                    seen.add(problem)
                    report(f"sample traffic: {app.name} got {problem} from {proxy} (retrying)")
            if stop.wait(interval):
                break
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--proxy", required=True, help="the proxy's base URL")
    parser.add_argument("--interval", type=float, default=INTERVAL_SECONDS)
    parser.add_argument("--max-requests", type=int, default=MAX_REQUESTS)
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, on_signal)
    failed = run(args.proxy, stop, interval=args.interval, max_requests=args.max_requests)
    print(f"sample traffic stopped ({failed} request(s) failed)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
