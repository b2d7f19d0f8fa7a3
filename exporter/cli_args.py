"""Command-line pieces that ``probe`` and ``loadtest`` share.

Both talk to one model of one API: they take the same ``--base-url``, ``--model`` and
``--provider-type``, check them the same way and read the key from the same variables
(never printed), and read durations the same way, so all of that is defined once, here.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from exporter.config import ProviderConfig, format_validation_error
from exporter.durations import parse_duration
from exporter.providers import ADAPTERS, adapter_class
from exporter.providers.base import ProviderAdapter

GENERIC_KEY_VAR = "PCE_API_KEY"
KEY_HELP = (
    "The key is read from PCE_API_KEY, else from the API's own variable: VENICE_API_KEY, "
    "ANTHROPIC_API_KEY, or for OpenAI-compatible URLs only a known host's variable "
    "(OPENAI_API_KEY for api.openai.com, DEEPSEEK_API_KEY for api.deepseek.com, ...); "
    "other hosts get no key unless PCE_API_KEY is set."
)


class UsageError(ValueError):
    """Bad command-line input: one line, exit status 2."""


def duration_arg(name: str, text: str) -> float:
    """The positive duration ``text`` (``--name``'s value) in seconds; UsageError if not."""
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"--{name}: {exc}") from None
    if value <= 0:
        raise UsageError(f"--{name}: must be positive")
    return value


def add_target_arguments(parser: argparse.ArgumentParser, *, model_help: str) -> None:
    parser.add_argument("--base-url", help="API base URL, e.g. https://api.venice.ai/api/v1")
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument(
        "--provider-type", default="openai", choices=sorted(ADAPTERS), help="API family"
    )


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go and which variable (if any) holds the key for them."""

    adapter_class: type[ProviderAdapter]
    base_url: str
    key: str | None
    key_var: str | None

    def missing_key_warning(self) -> str | None:
        """One line for stderr when no key variable is set; None when one is."""
        if self.key_var is not None:
            return None
        variables = key_variables(self.adapter_class, self.base_url)
        if len(variables) == 1:
            return (
                f"warning: {variables[0]} is not set: requests go without an API key "
                "(right for local servers)"
            )
        return f"warning: none of {', '.join(variables)} is set: requests go without an API key"

    def provider(self, provider_type: str, **settings: Any) -> ProviderConfig:
        """The target as a configured provider would be (the same rules and defaults), with
        the command's ``settings`` (None: the default); UsageError when one is invalid."""
        try:
            return ProviderConfig.model_validate(
                {
                    "name": "cli",
                    "type": provider_type,
                    "base_url": self.base_url,
                    "api_key_env": self.key_var or "",
                    **settings,
                }
            )
        except ValidationError as exc:
            raise UsageError(format_validation_error(exc)) from None


def resolve_target(args: argparse.Namespace, env: Mapping[str, str]) -> Target:
    """The target named by ``args``; UsageError for a missing or malformed base URL."""
    cls = adapter_class(args.provider_type)
    base_url = args.base_url or cls.default_base_url
    if not base_url:
        raise UsageError(f"--base-url is required for --provider-type {args.provider_type}")
    if not re.match(r"^https?://[^\s/]+", base_url):
        raise UsageError(f"--base-url: not an http(s) URL: {base_url!r}")
    key, key_var = resolve_key(cls, env, base_url)
    return Target(cls, base_url, key, key_var)


def key_variables(adapter_cls: type[ProviderAdapter], base_url: str = "") -> tuple[str, ...]:
    """Where the key may come from: PCE_API_KEY, then the API's conventional variable (for
    OpenAI-compatible URLs, only a known host's own variable)."""
    return tuple(filter(None, (GENERIC_KEY_VAR, adapter_cls.key_env_for(base_url))))


def resolve_key(
    adapter_cls: type[ProviderAdapter], env: Mapping[str, str], base_url: str = ""
) -> tuple[str | None, str | None]:
    """(key, variable name) from the first of ``key_variables`` that is set."""
    for var in key_variables(adapter_cls, base_url):
        value = env.get(var)
        if value:
            return value, var
    return None, None
