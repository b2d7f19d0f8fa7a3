"""The ``prompt-cache-exporter`` command: subcommands dispatch to their own modules.

Only the chosen subcommand's module is imported. The daemon is a long-running process whose
resident memory is mostly the code it has imported, and the other commands bring their own
(``probe`` and ``history`` the reports, ``loadtest`` its driver, ``simulate`` the simulator):
the command line is parsed once with every subcommand listed by name and help only, to learn
which one was chosen, then again with that one's arguments.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from exporter import __version__
from exporter.exits import EXIT_USAGE, run_command


@dataclass(frozen=True, slots=True)
class _Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    # A function, not a string: two of them quote cli_args.KEY_HELP, an import of its own.
    description: Callable[[], str] | None = None


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request line at INFO; probes make many and the URLs add nothing.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _key_help() -> str:
    from exporter.cli_args import KEY_HELP

    return KEY_HELP


def _lazy(module: str, function: str, *, asynchronous: bool = False) -> Callable[[Any], Any]:
    """``module.function``, imported only when called: only the chosen command's code loads."""

    def call(argument: Any) -> Any:
        target = getattr(importlib.import_module(module), function)
        return anyio.run(target, argument) if asynchronous else target(argument)

    return call


def _probe_description() -> str:
    return (
        "The cache microscope: run probes once against one model, print every request's "
        "tokens, cached tokens and timings, and curl commands that replay them. "
        f"{_key_help()} Exit status: 0 caching works, 1 it does not, 2 usage error, 3 no "
        "verdict, 130 interrupted, 141 output closed."
    )


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="configuration file (default: $PCE_CONFIG_FILE)")


def _run(args: argparse.Namespace) -> int:
    from exporter import daemon

    return daemon.main(args.config)


def _check_config(args: argparse.Namespace) -> int:
    return check_config(args.config)


def _loadtest_description() -> str:
    return (
        "Send -n requests at concurrency -c, each with the run's shared prefix and its own "
        "suffix, and report latency and time to first token cold vs warm, the hit ratio under "
        "load, statuses, errors and 429s. The estimated cost is printed first, and a run over "
        f"--max-total-tokens is refused before anything is sent. {_key_help()} Exit status: 0 "
        "caching held, 1 it did not, 2 usage error or refused by the cap, 3 no verdict, 130 "
        "interrupted, 141 output closed."
    )


COMMANDS: dict[str, _Command] = {
    "probe": _Command(
        help="run probes once against one model and print the evidence",
        add_arguments=_lazy("exporter.probe_cli", "add_arguments"),
        run=_lazy("exporter.probe_cli", "run", asynchronous=True),
        description=_probe_description,
    ),
    "simulate": _Command(
        help="run the local caching upstream (a SIMULATOR, not a real provider)",
        add_arguments=_lazy("exporter.simulator.cli", "add_arguments"),
        run=_lazy("exporter.simulator.cli", "main"),
        description=lambda: (
            "Start the bundled simulator: an OpenAI- and Anthropic-compatible HTTP server "
            "that emulates prompt caching, for demos and tests. It is not a real LLM."
        ),
    ),
    "run": _Command(
        help="run the exporter: probe on schedule and serve /metrics",
        add_arguments=_config_argument,
        run=_run,
        description=lambda: (
            "Run the exporter daemon. SIGHUP or POST /-/reload reloads the configuration; "
            "SIGTERM/SIGINT stop it gracefully."
        ),
    ),
    "check-config": _Command(
        help="validate a configuration file and exit (0 valid, 2 invalid)",
        add_arguments=_config_argument,
        run=_check_config,
    ),
    "history": _Command(
        help="export recorded probe runs as CSV, JSON, text or an HTML report",
        add_arguments=_lazy("exporter.history_cli", "add_arguments"),
        run=_lazy("exporter.history_cli", "run", asynchronous=True),
    ),
    "loadtest": _Command(
        help="bounded load against one model: does caching hold under load?",
        add_arguments=_lazy("exporter.loadtest.cli", "add_arguments"),
        run=_lazy("exporter.loadtest.cli", "run", asynchronous=True),
        description=_loadtest_description,
    ),
}


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The command line; only the subcommands in ``commands`` (default: all) get their
    arguments, and so import their modules. The others are listed by name and help."""
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
    for name, command in COMMANDS.items():
        if commands is not None and name not in commands:
            # No -h of its own: `COMMAND --help` is answered by the parser that has its arguments.
            sub.add_parser(name, help=command.help, add_help=False)
            continue
        description = command.description() if command.description is not None else None
        command.add_arguments(sub.add_parser(name, help=command.help, description=description))
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


def _dispatch(argv: Sequence[str] | None) -> int:
    # Top-level errors, --help and --version are answered here, before any subcommand loads.
    chosen, _ = build_parser(()).parse_known_args(argv)
    args = build_parser((chosen.command,)).parse_args(argv)
    _configure_logging(args.log_level)
    return COMMANDS[args.command].run(args)
