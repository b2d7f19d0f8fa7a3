"""curl commands that replay a request exactly, with the key left to the shell.

A secret header's credential is replaced by ``$VARIABLE`` (the environment variable the key
was read from), so a printed or attached command never contains the key, yet runs as is
once the variable is set. The body is either a file (``@path``, for the terminal) or inline
in a quoted here-document (for a report that must stand alone).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from exporter.providers.base import HttpRequest

# Quoted delimiter: the shell expands nothing inside the body. JSON dumped with indentation
# never has a line that is exactly this word (every string in it is quoted).
_HEREDOC = "JSON"


@dataclass(frozen=True, slots=True)
class Replay:
    """One request to replay: who sent it and the command."""

    label: str
    command: str


def request_body(request: HttpRequest) -> str | None:
    """The body as the replay sends it (the same JSON, readably indented)."""
    if request.json is None:
        return None
    return json.dumps(request.json, indent=1, ensure_ascii=False)


def curl_command(
    request: HttpRequest, key_var: str | None, *, body_file: Path | None = None
) -> str:
    """The command for ``request``: body from ``body_file`` if given, else inline."""
    stream = bool(request.json and request.json.get("stream"))
    lines = [f"curl -sS{' -N' if stream else ''} -X {request.method} {shlex.quote(request.url)}"]
    for name, value in request.headers.items():
        if name.lower() in request.secret_headers:
            # The key is never shown: the shell expands it from the environment.
            shown = re.sub(r"\S+$", f"${key_var or 'API_KEY'}", value)
            lines.append(f'-H "{name}: {shown}"')
        else:
            lines.append(f"-H {shlex.quote(f'{name}: {value}')}")
    body = request_body(request)
    if body is None:
        return " \\\n  ".join(lines)
    if body_file is not None:
        lines.append(f"--data-binary @{shlex.quote(str(body_file))}")
        return " \\\n  ".join(lines)
    lines.append(f"--data-binary @- <<'{_HEREDOC}'")
    return " \\\n  ".join(lines) + f"\n{body}\n{_HEREDOC}"


def file_replays(
    sent: list[tuple[str, HttpRequest]], key_var: str | None, directory: Path
) -> list[Replay]:
    """Replays for the terminal: each distinct body in a file of ``directory``."""
    files: dict[str, Path] = {}
    replays: list[Replay] = []
    for label, request in sent:
        body = request_body(request) or ""
        path = files.get(body)
        if path is None:
            slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
            path = files[body] = directory / f"{len(files) + 1:02d}-{slug}.json"
            path.write_text(body, encoding="utf-8")
        replays.append(Replay(label, curl_command(request, key_var, body_file=path)))
    return replays


def inline_replays(sent: list[tuple[str, HttpRequest]], key_var: str | None) -> list[Replay]:
    """Self-contained replays, one per distinct request (a prime and its repeat share one)."""
    by_command: dict[str, list[str]] = {}
    for label, request in sent:
        by_command.setdefault(curl_command(request, key_var), []).append(label)
    return [Replay(", ".join(labels), command) for command, labels in by_command.items()]
