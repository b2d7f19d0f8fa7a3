"""/metrics as prepared bytes: rendered when the state changes, copied when scraped.

Values change only when a probe finishes, minutes apart, while every Prometheus replica
scrapes every 15-60 s, so rendering per scrape is wasted work. Here each fragment of the
state (one model, one provider, the exporter's own figures) is formatted once, when it
changes, into one byte string per metric family. A scrape joins the fragments family by
family (the text format and OpenMetrics both require a family's samples to be one group)
and keeps the result, with its gzip form, until the next change; later scrapes send those
bytes as they are.

- Consistency: ``State.changes()`` copies every changed fragment under one lock
  acquisition, so a model is always rendered from one consistent copy, never half a run.
- Freshness: a scrape first applies whatever changed since the last render (only those
  fragments are formatted again; unchanged data is never re-rendered), so it sees every
  write made before it. ``Refresher`` does the same in the background right after writes,
  so a scrape usually finds the bytes ready.
- Time: a model in cooldown is rendered again when its cooldown ends.
- Bytes: the same as prometheus-client renders for ``exporter.metrics.ExporterCollector``
  (tested byte for byte, text and OpenMetrics).

gzip: the prepared part is compressed once per change into a raw deflate stream ending on
a byte boundary (``Z_SYNC_FLUSH``, not final); the live part of a scrape (process metrics,
proxy traffic) is compressed after it as the final block, and one gzip header and trailer
(CRC-32 continued over both, RFC 1952) make them one ordinary gzip member that every client
reads.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Final, Literal, cast

from prometheus_client import utils

from exporter.memtrim import release_free_pages
from exporter.metrics import (
    Catalogue,
    ExporterCollector,
    Family,
    write_exporter,
    write_model,
    write_provider,
)
from exporter.state import Changes, Histogram, ModelKey, State

__all__ = ["Exposition", "Format", "Prepared", "Refresher", "gzip_parts"]

log = logging.getLogger(__name__)

Format = Literal["text", "openmetrics"]
FORMATS: Final[tuple[Format, ...]] = ("text", "openmetrics")
GZIP_LEVEL: Final = 1  # fastest: ~1/20 of the size (level 6: ~1/24) at a third of the time
# A burst of writes (one run updates the model, then failures, reliability, budget) is
# rendered once: the refresher waits this long after the first write before it renders.
COALESCE_SECONDS: Final = 0.05
# Compressing is most of a render's cost (about 2 ms per MB): the refresher does it once the
# writes have paused this long, not after every burst; a scrape in between compresses itself.
QUIET_SECONDS: Final = 1.0
RENDER_BATCH: Final = 64  # models rendered before their lines are spliced in

_GZIP_HEADER: Final = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no mtime, OS unknown


# prometheus-client's float formatting (Go's), untyped upstream.
_go_float = cast(Callable[[float], str], utils.floatToGoString)


def _escape(value: str) -> str:
    # Label values, as prometheus-client writes them in both formats.
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


class _Lines:
    """Sample-line templates of one family (labels sorted by name, as prometheus-client
    writes them; the same lines in the text format and OpenMetrics)."""

    def __init__(self, family: Family) -> None:
        labels = family.labels
        self.order = sorted(range(len(labels)), key=lambda i: labels[i])
        names = [labels[i] for i in self.order]
        if family.kind == "histogram":
            with_le = (*labels, "le")
            self.bucket_order = sorted(range(len(with_le)), key=lambda i: with_le[i])
            self.bucket = _template(
                family.name + "_bucket", [with_le[i] for i in self.bucket_order]
            )
            self.count = _template(family.name + "_count", names)
            self.sum = _template(family.name + "_sum", names)
        suffix = "_total" if family.kind == "counter" else ""
        self.plain = _template(family.name + suffix, names)

    def sample(self, labels: Sequence[str], value: float) -> str:
        return self.plain % (*[_escape(labels[i]) for i in self.order], _go_float(value))

    def histogram(self, labels: Sequence[str], hist: Histogram) -> str:
        escaped = [_escape(v) for v in labels]
        base = [escaped[i] for i in self.order]
        out = []
        count = 0.0
        for le, count in hist.cumulative():
            with_le = [*escaped, le]
            values = [with_le[i] for i in self.bucket_order]
            out.append(self.bucket % (*values, _go_float(count)))
        out.append(self.count % (*base, _go_float(count)))
        out.append(self.sum % (*base, _go_float(hist.total)))
        return "".join(out)


def _template(name: str, labels: Sequence[str]) -> str:
    # Names are fixed identifiers ([a-z_]): no '%' to escape.
    if not labels:
        return name + " %s\n"
    pairs = ",".join(f'{label}="%s"' for label in labels)
    return name + "{" + pairs + "} %s\n"


def _headers(family: Family) -> dict[Format, bytes]:
    # As prometheus-client writes them: the text format names a counter with ``_total`` and
    # escapes backslash and newline in HELP; OpenMetrics names the family and escapes quotes.
    doc = family.documentation
    text_name = family.name + ("_total" if family.kind == "counter" else "")
    text_doc = doc.replace("\\", r"\\").replace("\n", r"\n")
    om_doc = text_doc.replace('"', r"\"")
    om_name = family.name
    return {
        "text": f"# HELP {text_name} {text_doc}\n# TYPE {text_name} {family.kind}\n".encode(),
        "openmetrics": f"# HELP {om_name} {om_doc}\n# TYPE {om_name} {family.kind}\n".encode(),
    }


class _FragmentSink:
    """Formats one fragment's samples, one run of lines per family of its group."""

    def __init__(self, lines: dict[Family, tuple[int, _Lines]], size: int) -> None:
        self._lines = lines
        self.parts: list[list[str]] = [[] for _ in range(size)]

    def sample(self, family: Family, labels: Sequence[str], value: float) -> None:
        index, lines = self._lines[family]
        self.parts[index].append(lines.sample(labels, value))

    def histogram(self, family: Family, labels: Sequence[str], hist: Histogram) -> None:
        index, lines = self._lines[family]
        self.parts[index].append(lines.histogram(labels, hist))

    def chunks(self) -> list[bytes]:
        return ["".join(lines).encode() for lines in self.parts]


@dataclass(frozen=True, slots=True)
class Prepared:
    """The ``llmcache_`` part of one scrape answer in one format, for one state generation:
    ``body``, or with gzip ``deflated`` (not final) and the ``crc`` of the uncompressed."""

    generation: int
    size: int
    body: bytes | None = None
    deflated: bytes | None = None
    crc: int = 0


class _Group:
    """The families one kind of fragment writes, and their lines for every fragment.

    All of it is one contiguous string, family after family, each family's section the
    fragments' lines in order; ``lengths[f][i]`` is fragment ``i``'s share of section ``f``.
    One allocation instead of one per fragment and family: thousands of small long-lived
    strings would pin the allocator's pools (measured: twice the resident size), and a
    scrape then joins two slices per family. A change splices the new lines in.
    """

    def __init__(self, families: tuple[Family, ...]) -> None:
        self.families = families
        self.lines = {f: (i, _Lines(f)) for i, f in enumerate(families)}
        self.headers = [_headers(f) for f in families]
        self.order: list[object] = []
        self.position: dict[object, int] = {}
        self.lengths: list[array[int]] = [array("I") for _ in families]
        self.blob = b""
        self.sections: list[tuple[int, int]] = [(0, 0)] * len(families)

    def sink(self) -> _FragmentSink:
        return _FragmentSink(self.lines, len(self.families))

    def update(
        self, rendered: dict[object, list[bytes] | None], order: list[object] | None
    ) -> None:
        """``rendered``: the new lines of changed fragments (None: gone); ``order``: every
        fragment in order, when the set of fragments changed."""
        if not rendered and order is None:
            return
        if order is None and all(c is not None and k in self.position for k, c in rendered.items()):
            self._splice(rendered)
            return
        if order is None:  # not expected (a new key comes with an order): keep ours, append
            order = [k for k in self.order if rendered.get(k, ()) is not None]
            order += [k for k, c in rendered.items() if c is not None and k not in self.position]
        self._rebuild(rendered, [k for k in order if k in self.position or rendered.get(k)])

    def parts(self, fmt: Format) -> list[bytes | memoryview]:
        view = memoryview(self.blob)
        out: list[bytes | memoryview] = []
        for headers, (start, end) in zip(self.headers, self.sections, strict=True):
            out.append(headers[fmt])
            if end > start:
                out.append(view[start:end])
        return out

    def selected_parts(self, fmt: Format, wanted: frozenset[str]) -> list[bytes | memoryview]:
        """Only the samples named, and only families that keep one."""
        view = memoryview(self.blob)
        out: list[bytes | memoryview] = []
        for index, family in enumerate(self.families):
            start, end = self.sections[index]
            chunks = _select(view[start:end], family, wanted)
            if chunks:
                out.append(self.headers[index][fmt])
                out.extend(chunks)
        return out

    def _starts(self, index: int) -> list[int]:
        return list(accumulate(self.lengths[index], initial=self.sections[index][0]))

    def _splice(self, rendered: dict[object, list[bytes] | None]) -> None:
        changed = sorted((self.position[k], c) for k, c in rendered.items() if c is not None)
        view = memoryview(self.blob)
        parts: list[bytes | memoryview] = []
        sections = []
        size = 0
        for index, (start, end) in enumerate(self.sections):
            starts = self._starts(index)
            lengths = self.lengths[index]
            begin, cursor = size, start
            for position, chunks in changed:
                if starts[position] > cursor:
                    parts.append(view[cursor : starts[position]])
                    size += starts[position] - cursor
                chunk = chunks[index]
                parts.append(chunk)
                size += len(chunk)
                lengths[position] = len(chunk)
                cursor = starts[position + 1]
            if end > cursor:
                parts.append(view[cursor:end])
                size += end - cursor
            sections.append((begin, size))
        self.blob = b"".join(parts)
        self.sections = sections

    def _rebuild(self, rendered: dict[object, list[bytes] | None], order: list[object]) -> None:
        view = memoryview(self.blob)
        parts: list[bytes | memoryview] = []
        sections = []
        lengths = [array("I") for _ in self.families]
        size = 0
        for index in range(len(self.families)):
            starts = self._starts(index)
            begin = size
            # Fragments that keep their place stay one slice of the old string, not one
            # (heavy) memoryview each.
            run_start = run_end = -1
            for key in order:
                chunks = rendered.get(key)
                if chunks is None:
                    position = self.position[key]
                    start, end = starts[position], starts[position + 1]
                    if start != run_end:
                        if run_end > run_start:
                            parts.append(view[run_start:run_end])
                        run_start = start
                    run_end = end
                    length = end - start
                else:
                    if run_end > run_start:
                        parts.append(view[run_start:run_end])
                    run_start = run_end = -1
                    parts.append(chunks[index])
                    length = len(chunks[index])
                lengths[index].append(length)
                size += length
            if run_end > run_start:
                parts.append(view[run_start:run_end])
            sections.append((begin, size))
        self.blob = b"".join(parts)
        self.sections = sections
        self.lengths = lengths
        self.order = order
        self.position = {key: i for i, key in enumerate(order)}


def _select(section: memoryview, family: Family, wanted: frozenset[str]) -> list[bytes]:
    """The lines of a family section whose sample is wanted (prometheus-client's restricted
    registry keeps samples by name: a histogram's ``_bucket`` alone is a valid choice)."""
    names = family.sample_names()
    chosen = wanted.intersection(names)
    if not chosen or not len(section):
        return []
    if len(chosen) == len(names):
        return [bytes(section)]
    starts = tuple(f"{n}{sep}".encode() for n in chosen for sep in ("{", " "))
    kept = b"".join(
        line for line in bytes(section).splitlines(keepends=True) if line.startswith(starts)
    )
    return [kept] if kept else []


class Exposition:
    """The prepared ``llmcache_`` exposition of one ``State`` (its only ``changes()``
    reader). Thread-safe; ``prepared`` is called from the server's render thread."""

    def __init__(self, state: State, *, now: Callable[[], float]) -> None:
        self._state = state
        self._now = now
        self.catalogue = Catalogue(state.per_model_histograms)
        self._models = _Group(self.catalogue.model)
        self._providers = _Group(self.catalogue.provider)
        self._exporter = _Group(self.catalogue.exporter)
        self._lock = threading.Lock()
        self._generation = -1
        self._gzipped: dict[Format, Prepared] = {}
        # Formats scraped with gzip so far: the refresher compresses them ahead of the scrape.
        self._in_use: set[Format] = set()
        # Models whose exposition changes at a time (a cooldown's end), and the earliest.
        self._expiring: dict[ModelKey, float] = {}
        self._next_expiry = 0.0

    @property
    def families(self) -> tuple[Family, ...]:
        return self.catalogue.families

    @property
    def generation(self) -> int:
        """The state generation the prepared bytes reflect (-1 before the first render)."""
        return self._generation

    def collector(self) -> ExporterCollector:
        """The fresh render of the same state (for what is not prepared)."""
        return ExporterCollector(self._state, now=self._now)

    def prepared(self, fmt: Format, *, gzip: bool) -> Prepared:
        """The current exposition (every write made before the call included)."""
        if gzip:
            self._in_use.add(fmt)
            product = self._gzipped.get(fmt)
            if product is not None and self._is_current(product.generation):
                return product
        with self._lock:
            self._refresh_locked()
            if not gzip:
                body = self._join(fmt)
                return Prepared(self._generation, len(body), body=body)
            product = self._gzipped.get(fmt)
            if product is None:
                product = self._compress(fmt)
                self._gzipped[fmt] = product
            return product

    def filtered(self, fmt: Format, names: Iterable[str]) -> bytes:
        """Only the samples named (``name[]``, as prometheus-client's restricted registry:
        families without a selected sample are left out entirely)."""
        wanted = frozenset(names)
        with self._lock:
            self._refresh_locked()
            parts = [p for g in self._groups() for p in g.selected_parts(fmt, wanted)]
        return b"".join(parts)

    def refresh(self, *, compress: bool = True) -> None:
        """Apply pending changes and, with ``compress``, compress the formats scraped with
        gzip so far (the refresher's work)."""
        with self._lock:
            self._refresh_locked()
            for fmt in sorted(self._in_use) if compress else ():
                if fmt not in self._gzipped:
                    self._gzipped[fmt] = self._compress(fmt)

    # -- internals --------------------------------------------------------------------------

    def _groups(self) -> tuple[_Group, _Group, _Group]:
        return (self._models, self._providers, self._exporter)

    def _join(self, fmt: Format) -> bytes:
        return b"".join([p for g in self._groups() for p in g.parts(fmt)])

    def _compress(self, fmt: Format) -> Prepared:
        # Part by part (two per family), not a joined copy of the whole body first.
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        out: list[bytes] = []
        crc = size = 0
        for part in (p for g in self._groups() for p in g.parts(fmt)):
            out.append(compressor.compress(part))
            crc = zlib.crc32(part, crc)
            size += len(part)
        out.append(compressor.flush(zlib.Z_SYNC_FLUSH))
        return Prepared(self._generation, size, deflated=b"".join(out), crc=crc)

    def _is_current(self, generation: int) -> bool:
        if self._next_expiry and self._now() >= self._next_expiry:
            return False
        return generation == self._state.generation

    def _refresh_locked(self) -> None:
        if self._next_expiry and self._now() >= self._next_expiry:
            now = self._now()
            self._state.mark_models([k for k, t in self._expiring.items() if t <= now])
        if self._generation == self._state.generation:
            return
        self._apply(self._state.changes())

    def _apply(self, changes: Changes) -> None:
        now = self._now()
        per_model = self.catalogue.per_model_histograms
        model_order: list[object] | None = (
            None if changes.model_order is None else list(changes.model_order)
        )
        # In batches: a full render (start-up, a new model list) never holds every model's
        # new lines at once beside the old and new strings (a few MB of short-lived objects
        # leave the allocator's pools fragmented for good).
        pending = changes.models
        rendered_any = bool(pending)
        while pending:
            models: dict[object, list[bytes] | None] = {}
            # Popped, so each model's copy is freed once its lines are made.
            for _ in range(min(RENDER_BATCH, len(pending))):
                key, model = pending.popitem()
                self._expiring.pop(key, None)
                if model is None:
                    models[key] = None
                    continue
                sink = self._models.sink()
                until = write_model(sink, model, now, per_model)
                models[key] = sink.chunks()
                if until:
                    self._expiring[key] = until
            self._models.update(models, model_order)
        if not rendered_any and model_order is not None:
            self._models.update({}, model_order)
        providers: dict[object, list[bytes] | None] = {}
        for name, provider in changes.providers.items():
            if provider is None:
                providers[name] = None
                continue
            sink = self._providers.sink()
            write_provider(sink, provider, per_model)
            providers[name] = sink.chunks()
        provider_order = changes.provider_order
        self._providers.update(providers, None if provider_order is None else list(provider_order))
        if changes.exporter is not None:
            sink = self._exporter.sink()
            write_exporter(sink, changes.exporter)
            self._exporter.update({None: sink.chunks()}, [None])
        self._next_expiry = min(self._expiring.values(), default=0.0)
        self._generation = changes.generation
        self._gzipped.clear()


def gzip_parts(prepared: Prepared, live: bytes) -> list[bytes]:
    """One gzip member: the prepared deflate stream, then ``live`` compressed as the final
    block, then the CRC-32 and length of both."""
    assert prepared.deflated is not None
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    tail = compressor.compress(live) + compressor.flush(zlib.Z_FINISH)
    crc = zlib.crc32(live, prepared.crc)
    size = (prepared.size + len(live)) & 0xFFFFFFFF
    return [_GZIP_HEADER, prepared.deflated, tail, struct.pack("<II", crc, size)]


class Refresher:
    """Renders changes in a background thread right after the writes, so scrapes find the
    bytes ready. ``with Refresher(exposition, state):`` runs it; leaving stops it."""

    def __init__(self, exposition: Exposition, state: State) -> None:
        self._exposition = exposition
        self._state = state
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="metrics-render", daemon=True)

    def __enter__(self) -> Refresher:
        self._state.set_listener(self._wake.set)
        self._thread.start()
        self._wake.set()  # the first full render, before the first scrape asks for it
        return self

    def __exit__(self, *exc: object) -> None:
        self._state.set_listener(None)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5.0)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._stop:
                return
            time.sleep(COALESCE_SECONDS)
            self._wake.clear()
            self._render(compress=False)
            if not self._wake.wait(QUIET_SECONDS):  # no write for a while: compress too
                self._render(compress=True)
                release_free_pages()

    def _render(self, *, compress: bool) -> None:
        try:
            self._exposition.refresh(compress=compress)
        except Exception:  # a bug must not stop the thread; the scrape reports it
            log.exception("rendering the metrics in the background failed")
