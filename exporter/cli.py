"""The ``prompt-cache-exporter`` command: subcommands dispatch to their own modules."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import anyio

from exporter import __version__
from exporter.exits import EXIT_USAGE, run_command


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request line at INFO; probes make many and the URLs add nothing.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    from exporter import probe_cli
    from exporter.cli_args import KEY_HELP
    from exporter.simulator import cli as simulator_cli

    parser = argparse.ArgumentParser(
        prog="prompt-cache-exporter",
        description="Probe LLM APIs for working prompt caching and export the results "
        "as Prometheus metrics.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="log level for this command (default: warning; `run` uses the config's level)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    probe = sub.add_parser(
        "probe",
        help="run probes once against one model and print the evidence",
        description="The cache microscope: run probes once against one model, print every "
        "request's tokens, cached tokens and timings, and curl commands that replay them. "
        f"{KEY_HELP} Exit status: 0 caching works, 1 it does not, 2 usage error, 3 no "
        "verdict, 130 interrupted, 141 output closed.",
    )
    probe_cli.add_arguments(probe)

    simulate = sub.add_parser(
        "simulate",
        help="run the local caching upstream (a SIMULATOR, not a real provider)",
        description="Start the bundled simulator: an OpenAI- and Anthropic-compatible HTTP "
        "server that emulates prompt caching, for demos and tests. It is not a real LLM.",
    )
    simulator_cli.add_arguments(simulate)

    run = sub.add_parser(
        "run",
        help="run the exporter: probe on schedule and serve /metrics",
        description="Run the exporter daemon. SIGHUP or POST /-/reload reloads the "
        "configuration; SIGTERM/SIGINT stop it gracefully.",
    )
    run.add_argument("--config", help="configuration file (default: $PCE_CONFIG_FILE)")

    check = sub.add_parser(
        "check-config",
        help="validate a configuration file and exit (0 valid, 2 invalid)",
    )
    check.add_argument("--config", help="configuration file (default: $PCE_CONFIG_FILE)")

    from exporter import history_cli

    history = sub.add_parser(
        "history", help="export recorded probe runs as CSV, JSON, text or an HTML report"
    )
    history_cli.add_arguments(history)

    from exporter.loadtest import cli as loadtest_cli

    loadtest = sub.add_parser(
        "loadtest",
        help="bounded load against one model: does caching hold under load?",
        description="Send -n requests at concurrency -c, each with the run's shared prefix and "
        "its own suffix, and report latency and time to first token cold vs warm, the hit "
        "ratio under load, statuses, errors and 429s. The estimated cost is printed first, "
        f"and a run over --max-total-tokens is refused before anything is sent. {KEY_HELP} "
        "Exit status: 0 caching held, 1 it did not, 2 usage error or refused by the cap, 3 no "
        "verdict, 130 interrupted, 141 output closed.",
    )
    loadtest_cli.add_arguments(loadtest)
    return parser


def check_config(path: str | None) -> int:
    """Validate the configuration and the web config file it names (TLS, basic auth), and
    say what the schedule will cost."""
    from exporter.config import ConfigError, check_config_command, load_config
    from exporter.forecast import ConfigForecast
    from exporter.webconfig import WebConfigError, load_web_config

    status = check_config_command(path, forecast=ConfigForecast)
    if status != 0:
        return status
    try:
        web_config = load_config(path).server.web_config_file
        if web_config is not None:
            load_web_config(web_config)
    except (ConfigError, WebConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Exit statuses are documented in exporter.exits and the README."""
    return run_command(lambda: _dispatch(argv))


def _dispatch(argv: Sequence[str] | None) -> int:  # noqa: RET503 - parser.error exits
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    if args.command == "probe":
        from exporter import probe_cli

        return anyio.run(probe_cli.run, args)
    if args.command == "simulate":
        from exporter.simulator import cli as simulator_cli

        return simulator_cli.main(args)
    if args.command == "run":
        from exporter import daemon

        return daemon.main(args.config)
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "history":
        from exporter import history_cli

        return anyio.run(history_cli.run, args)
    if args.command == "loadtest":
        from exporter.loadtest import cli as loadtest_cli

        return anyio.run(loadtest_cli.run, args)
    parser.error(f"unknown command {args.command!r}")  # exits with status 2
