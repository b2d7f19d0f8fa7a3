"""``prompt-cache-exporter simulate``: run the simulator in the foreground until a signal."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from typing import Any

import anyio

from exporter.exits import EXIT_USAGE, listen_error
from exporter.simulator.config import SimConfig, SimConfigError, load_sim_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8089, help="port to bind (default 8089)")
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address and port in one (overrides --host and --port)",
    )
    parser.add_argument("--config", metavar="FILE", help="simulator TOML file (models, balances)")
    parser.add_argument("--seed", type=int, help="seed for flaky models (default 42)")
    parser.add_argument(
        "--latency-scale",
        type=float,
        metavar="F",
        help="multiply every simulated latency by F; 0 answers at once (default 1)",
    )
    parser.add_argument(
        "--with-fault-models",
        action="store_true",
        help="also serve the sim-fault-* models (HTML errors, bad JSON, huge bodies, ...)",
    )
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require the key held in this environment variable (Bearer or x-api-key)",
    )
    parser.add_argument("--balance-usd", type=float, metavar="USD", help="starting USD balance")
    parser.add_argument("--balance-diem", type=float, metavar="DIEM", help="starting DIEM balance")


def build_config(args: argparse.Namespace) -> SimConfig:
    """The config the arguments describe. Raises SimConfigError."""
    config = load_sim_config(args.config) if args.config else SimConfig()
    changes: dict[str, Any] = {}
    for option in ("seed", "latency_scale", "balance_usd", "balance_diem"):
        value = getattr(args, option, None)
        if value is not None:
            changes[option] = value
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise SimConfigError(
                f"--api-key-env: environment variable {args.api_key_env} is not set"
            )
        changes["api_key"] = key
    if changes:
        config = dataclasses.replace(config, **changes)
    if args.with_fault_models:
        config = config.with_fault_models()
    return config


def _address(args: argparse.Namespace) -> tuple[str, int]:
    if args.listen:
        host, sep, port = str(args.listen).rpartition(":")
        if not sep or not port.isdigit():
            raise SimConfigError(f"--listen must be HOST:PORT, not {args.listen!r}")
        return host.strip("[]") or "127.0.0.1", int(port)
    return args.host, args.port


async def run(args: argparse.Namespace) -> int:
    # Imported here: `prompt-cache-exporter run` builds this module's parser too and must not
    # load the simulator's server code.
    from exporter.simulator.app import BANNER
    from exporter.simulator.server import serve_simulator

    try:
        config = build_config(args)
        host, port = _address(args)
    except SimConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    listening = False
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with serve_simulator(config, host=host, port=port) as sim:
                listening = True
                names = ", ".join(m.name for m in config.models)
                print(f"{BANNER}; listening on {sim.url} (base URL {sim.base_url})", flush=True)
                print(f"simulated models: {names}", flush=True)
                async for _ in signals:
                    break
        except OSError as exc:
            if listening:
                raise
            print(f"error: {listen_error(host, port, exc)}", file=sys.stderr)
            return EXIT_USAGE
    print("simulator stopped", flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    return anyio.run(run, args)
