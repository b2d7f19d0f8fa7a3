"""The contract every provider adapter implements, plus the parsing helpers they share.

An adapter knows one API family: how to build a chat request (with cache markers where the
API needs them), how to read usage from a JSON body or a stream, what response headers mean
(balance, rate limits, request id), and how to list models. It does no I/O itself: the
transport sends what the adapter builds and hands back what came in, so adapters are tested
with plain fixtures.
"""

from __future__ import annotations

import fnmatch
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from exporter.results import Completion, ErrorType, ModelInfo, ResponseMeta, Usage

# A single usage figure above this is not a real measurement (no model has a context this
# large), so the response is treated as bad rather than counted.
MAX_PLAUSIBLE_TOKENS = 50_000_000
DEFAULT_MODEL_CAP = 200


class BadResponse(Exception):
    """The upstream answered, but not with something we can trust. The message is one line."""


class UpstreamError(Exception):
    """An error the upstream reported in-band (inside a 200 stream or body)."""

    def __init__(self, error_type: ErrorType, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass(frozen=True, slots=True)
class Prompt:
    """A two-message chat prompt; ``system`` starts with the run id so runs never share a prefix."""

    system: str
    user: str


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A request to send. Header names in ``secret_headers`` (lower case) carry credentials."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    json: dict[str, Any] | None = None
    secret_headers: frozenset[str] = frozenset()

    def redacted_headers(self, placeholder: str = "<redacted>") -> dict[str, str]:
        return {
            k: (placeholder if k.lower() in self.secret_headers else v)
            for k, v in self.headers.items()
        }


class StreamDecoder(ABC):
    """Consumes one streamed response event by event and assembles a Completion."""

    @abstractmethod
    def feed(self, event: str | None, data: str) -> bool:
        """Consume one server-sent event (``event`` is the SSE event name, if any).

        Returns True when the event carried generated output (the first such event marks
        time to first token). Raises UpstreamError for in-band error events and BadResponse
        for data that cannot be parsed.
        """

    @abstractmethod
    def finish(self) -> Completion:
        """Called once the stream has ended. Raises BadResponse if usage never arrived."""


class ProviderAdapter(ABC):
    """One API family. Subclasses set the class attributes and implement the abstract methods."""

    type_name: ClassVar[str]
    # Prompt length (tokens) below which the provider does not cache at all.
    default_min_cacheable_tokens: ClassVar[int] = 1024
    # Repeats a basic verdict may need before the first hit (DeepSeek persists prefixes lazily).
    default_warmup_repeats: ClassVar[int] = 1
    supports_streaming: ClassVar[bool] = True
    # True: every response carries cache fields. None: depends on the server; decided per
    # response (absent fields mean "not reported", never "0 cached").
    reports_cache_fields: ClassVar[bool | None] = None
    # Conventional environment variables holding this API's key, in order of preference.
    key_env_vars: ClassVar[tuple[str, ...]] = ()
    # Where the API lives when no base URL is configured (None: a base URL is required).
    default_base_url: ClassVar[str | None] = None
    # Whether the models endpoint publishes per-model prices (a USD budget can then be
    # enforced without a price table in the configuration).
    publishes_prices: ClassVar[bool] = False

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        min_cacheable_tokens: int | None = None,
        warmup_repeats: int | None = None,
        stream: bool = True,
        max_tokens: int = 8,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.min_cacheable_tokens = (
            min_cacheable_tokens
            if min_cacheable_tokens is not None
            else self.default_min_cacheable_tokens
        )
        self.warmup_repeats = (
            warmup_repeats if warmup_repeats is not None else self.default_warmup_repeats
        )
        self.stream = stream and self.supports_streaming
        self.max_tokens = max_tokens
        self.extra_headers = dict(extra_headers or {})

    @classmethod
    def key_env_for(cls, base_url: str) -> str | None:
        """The conventional variable holding this API's key at ``base_url`` (None: none)."""
        return cls.key_env_vars[0] if cls.key_env_vars else None

    @classmethod
    def publishes_prices_at(cls, base_url: str) -> bool:
        """Whether the models endpoint at ``base_url`` publishes prices."""
        return cls.publishes_prices

    def __repr__(self) -> str:  # never show the key
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def redact(self, text: str) -> str:
        """``text`` without the API key or any piece of it (see ``scrub``)."""
        return scrub(text, self._api_key)

    def redact_bytes(self, raw: bytes) -> bytes:
        """A whole upstream body or line without the key, before anything parses or cuts it."""
        key = self._api_key
        if key and len(key) >= MIN_SECRET_CHARS:
            return raw.replace(key.encode("utf-8"), REDACTED.encode())
        return raw

    def min_cacheable_for(self, model: str) -> int:
        """The minimum cacheable prompt length for ``model`` (families differ, e.g. Claude)."""
        return self.min_cacheable_tokens

    # -- requests -------------------------------------------------------------------------

    @abstractmethod
    def chat_request(self, model: str, prompt: Prompt, *, stream: bool) -> HttpRequest:
        """The request for one completion of ``prompt`` (cache markers included if needed)."""

    @abstractmethod
    def models_request(self) -> HttpRequest: ...

    def balance_request(self) -> HttpRequest | None:
        """A cheap request that reports the account balance, if the API has one."""
        return None

    # -- responses ------------------------------------------------------------------------

    @abstractmethod
    def parse_completion(self, body: Any) -> Completion:
        """Parse a non-streamed JSON body (already decoded). Raises BadResponse."""

    @abstractmethod
    def stream_decoder(self) -> StreamDecoder: ...

    @abstractmethod
    def parse_models(self, body: Any) -> list[ModelInfo]:
        """Parse the models endpoint's JSON body. Raises BadResponse."""

    def parse_balance(self, body: Any) -> dict[str, float]:
        """Parse the balance endpoint's JSON body into currency -> amount."""
        return {}

    def parse_meta(self, headers: Mapping[str, str]) -> ResponseMeta:
        """Headers common to most APIs: request id, Retry-After, x-ratelimit-remaining-*."""
        return ResponseMeta(
            request_id=first_header(headers, "x-request-id", "request-id", "cf-ray"),
            ratelimit_remaining=ratelimit_remaining(headers, "x-ratelimit-remaining-"),
            retry_after=retry_after_seconds(headers),
        )

    def error_message(self, status: int, body: Any) -> str:
        """A one-line description of an error response (decoded JSON, or None)."""
        return f"HTTP {status}" + (f": {extract_error_text(body)}" if body is not None else "")

    def classify_error(self, status: int, body: Any) -> ErrorType:
        """Map an HTTP error status (and body) to an error type."""
        return classify_status(status)


# -- shared helpers ---------------------------------------------------------------------------

REDACTED = "<redacted>"
MIN_SECRET_CHARS = 4  # a "key" shorter than this is not worth hiding (and would match anything)
# A run of this many characters of the key, anywhere, is treated as part of it: an excerpt cut
# at a length limit elsewhere can leave a prefix of the key at its end (or a suffix at its
# start) that no whole-key replacement finds.
MIN_SECRET_FRAGMENT = 6


def scrub(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` and every fragment of it (``MIN_SECRET_FRAGMENT`` or more of
    its characters in a row) replaced by ``<redacted>``. For short strings (messages, ids):
    whole bodies are cleaned with ``redact_bytes`` before they are parsed."""
    if not secret or len(secret) < MIN_SECRET_CHARS or not text:
        return text
    text = text.replace(secret, REDACTED)
    size = min(MIN_SECRET_FRAGMENT, len(secret))
    pieces = {secret[i : i + size] for i in range(len(secret) - size + 1)}
    out: list[str] = []
    i = start = 0
    while i <= len(text) - size:
        if text[i : i + size] not in pieces:
            i += 1
            continue
        end = i + size
        while end < len(text) and text[i : end + 1] in secret:
            end += 1
        out += [text[start:i], REDACTED]
        i = start = end
    return "".join([*out, text[start:]])


def classify_status(status: int) -> ErrorType:
    if status == 429:
        return ErrorType.RATE_LIMIT
    if status in (401, 403):
        return ErrorType.AUTH
    if status == 402:
        return ErrorType.INSUFFICIENT_FUNDS
    if status in (408, 504):
        return ErrorType.TIMEOUT
    return ErrorType.API_ERROR


def first_header(headers: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = headers.get(name)
        if value:
            return one_line(value, 200)
    return None


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds: ``retry-after-ms`` first (OpenAI, Anthropic), then
    ``retry-after`` as delta-seconds. An HTTP-date form is ignored (the backoff applies)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        value = parse_number(ms)
        if value is not None and value >= 0:
            return value / 1000.0
    secs = headers.get("retry-after")
    if secs is not None:
        value = parse_number(secs)
        if value is not None and value >= 0:
            return value
    return None


# The ``resource`` label values of llmcache_ratelimit_remaining: a fixed set, so an upstream
# sending hundreds of made-up ``x-ratelimit-remaining-*`` headers cannot create series.
RATELIMIT_RESOURCES = ("requests", "tokens", "input_tokens", "output_tokens")


def ratelimit_remaining(headers: Mapping[str, str], prefix: str) -> dict[str, float]:
    """``<prefix><resource>: <number>`` headers as resource -> remaining, for the resources
    of ``RATELIMIT_RESOURCES`` only (``input-tokens`` is read as ``input_tokens``); any
    other header with the prefix is ignored."""
    lowered = {name.lower(): value for name, value in headers.items()}
    out: dict[str, float] = {}
    for resource in RATELIMIT_RESOURCES:
        for spelling in {resource, resource.replace("_", "-")}:
            number = parse_number(lowered.get(prefix + spelling))
            if number is not None and number >= 0:
                out[resource] = number
    return out


def parse_number(value: Any) -> float | None:
    """A finite number from a JSON number or numeric string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def token_count(value: Any, name: str, *, required: bool = True) -> int | None:
    """A usage figure: a non-negative integer (integral floats and digit strings accepted).

    Missing or null gives None when not required; anything else wrong raises BadResponse.
    """
    if value is None:
        if required:
            raise BadResponse(f"usage field {name} is missing")
        return None
    number = parse_number(value)
    if number is None or not number.is_integer():
        raise BadResponse(f"usage field {name} is not an integer: {one_line(repr(value), 40)}")
    if number < 0:
        raise BadResponse(f"usage field {name} is negative: {int(number)}")
    if number > MAX_PLAUSIBLE_TOKENS:
        raise BadResponse(f"usage field {name} is implausibly large: {int(number)}")
    return int(number)


def checked_usage(
    prompt: int, cached: int | None, cache_write: int | None, completion: int
) -> Usage:
    """Cross-field sanity checks that hold for every API once normalised."""
    if cached is not None and cached > prompt:
        raise BadResponse(f"cached tokens ({cached}) exceed prompt tokens ({prompt})")
    if cache_write is not None and cache_write > prompt:
        raise BadResponse(f"cache-write tokens ({cache_write}) exceed prompt tokens ({prompt})")
    if cached is not None and cache_write is not None and cached + cache_write > prompt:
        raise BadResponse(
            f"cached ({cached}) plus cache-write ({cache_write}) tokens exceed prompt ({prompt})"
        )
    return Usage(prompt, cached, cache_write, completion)


def get_path(obj: Any, *path: str) -> Any:
    """obj[path[0]][path[1]]..., or None where any step is missing or not an object."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def extract_error_text(body: Any) -> str:
    """The message of the common error shapes: {"error": "..."}, {"error": {"message": ...}},
    {"message": ...}, Anthropic's {"type": "error", "error": {...}}."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, str):
            return one_line(err)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("type") or err.get("code")
            if msg is not None:
                return one_line(str(msg))
        msg = body.get("message") or body.get("detail")
        if msg is not None:
            return one_line(str(msg))
    if isinstance(body, str):
        return one_line(body, 120)
    return "no error message"


def select_models(
    models: Iterable[str],
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    cap: int = DEFAULT_MODEL_CAP,
) -> list[str]:
    """Model ids matching any include glob and no exclude glob, sorted, at most ``cap``.

    The cap keeps label cardinality bounded whatever the provider lists.
    """
    inc = list(include) or ["*"]
    exc = list(exclude)
    chosen = sorted(
        {
            m
            for m in models
            if any(fnmatch.fnmatchcase(m, p) for p in inc)
            and not any(fnmatch.fnmatchcase(m, p) for p in exc)
        }
    )
    return chosen[:cap]
