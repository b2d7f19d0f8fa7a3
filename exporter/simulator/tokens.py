"""The simulator's tokenizer: deterministic, dependency-free, and easy to predict in tests.

It is not any real model's tokenizer. What matters is that a prompt's token count can be
computed exactly by a test (or by the prompt generator calibrating sizes), and that the
token sequence is a stable function of the text, so prefixes of equal text share tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")

# Like OpenAI's chat format: every message costs start, role, separator and end markers,
# and the reply is primed with start, role and separator.
MESSAGE_OVERHEAD = 4
REPLY_PRIMING = 3


def tokenize(text: str) -> list[str]:
    """Words and single punctuation characters; whitespace is not a token."""
    return _TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    return len(_TOKEN_RE.findall(text))


@dataclass(frozen=True, slots=True)
class Segment:
    """One piece of a message's content; ``breakpoint`` marks an Anthropic ``cache_control``."""

    text: str
    breakpoint: bool = False


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    segments: tuple[Segment, ...]


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    """A prompt's token sequence, plus the prefix lengths at which cache breakpoints end."""

    tokens: list[str]
    breakpoints: tuple[int, ...] = ()
    # End of the last content token (before the closing markers): where Anthropic's
    # automatic (top-level) cache_control places its breakpoint.
    content_end: int = 0

    def __len__(self) -> int:
        return len(self.tokens)


def _role_marker(role: str) -> str:
    return f"<|{role}|>"


def tokenize_messages(messages: Iterable[ChatMessage]) -> TokenizedPrompt:
    tokens: list[str] = []
    breakpoints: list[int] = []
    content_end = 0
    for message in messages:
        tokens += ["<|im_start|>", _role_marker(message.role), "<|im_sep|>"]
        for segment in message.segments:
            tokens += tokenize(segment.text)
            if segment.breakpoint:
                breakpoints.append(len(tokens))
        content_end = len(tokens)
        tokens.append("<|im_end|>")
    tokens += ["<|im_start|>", _role_marker("assistant"), "<|im_sep|>"]
    return TokenizedPrompt(tokens, tuple(breakpoints), content_end)


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts.

    Non-text parts (images, audio) carry no tokens here; anything malformed counts as empty,
    so this helper never raises (the HTTP layer validates shapes before tokenizing).
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    return ""


def chat_tokens(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """Token sequence of an OpenAI-style ``messages`` list (content string or list of parts)."""
    converted = (
        ChatMessage(str(m.get("role", "user")), (Segment(content_text(m.get("content"))),))
        for m in messages
    )
    return tokenize_messages(converted).tokens


def chat_token_count(messages: Sequence[Mapping[str, Any]]) -> int:
    """``prompt_tokens`` the simulator reports for ``messages``:
    sum of (4 + content tokens) per message, plus 3."""
    return len(chat_tokens(messages))
