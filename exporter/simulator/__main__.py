"""``python -m exporter.simulator``: the same as ``prompt-cache-exporter simulate``."""

import argparse

from exporter.simulator.cli import add_arguments, main

parser = argparse.ArgumentParser(
    prog="python -m exporter.simulator",
    description="Run the prompt-cache-exporter SIMULATOR (not a real LLM provider).",
)
add_arguments(parser)
raise SystemExit(main(parser.parse_args()))
