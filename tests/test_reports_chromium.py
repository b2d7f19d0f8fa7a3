"""HTML reports opened in a real browser: headless Chromium (Debian package `chromium`).

Chromium renders the file (a screenshot), dumps the DOM it built, and logs every network
request it made. Its own background traffic (update and time checks) is pointed at a
closed port on 127.0.0.1 so nothing leaves the machine; requests the page made are told
apart by their initiator (the browser's own have none). A control page that does load an
image proves the check sees page requests. The browser is required, as in CI: a missing
one fails these tests, it never skips them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import anyio
import pytest

from exporter import reports
from exporter.simulator.config import SimConfig
from exporter.simulator.server import serve_simulator
from tests.conftest import open_rig
from tests.simulator_process import free_port
from tests.test_reports import GENERATED, HOSTILE_ERROR, HOSTILE_MODEL, _hostile_result, parse

pytestmark = pytest.mark.anyio

WINDOW = (1280, 1800)
FLAGS = (
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


@dataclasses.dataclass(frozen=True)
class Opened:
    dom: str
    screenshot: bytes
    page_requests: list[str]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "required binary chromium not found on PATH; install it (Debian package `chromium`, "
        "scripts/bootstrap.sh --system does) - these tests never skip",
        pytrace=False,
    )


def open_in_chromium(page: Path, work: Path) -> Opened:
    work.mkdir()
    netlog, shot = work / "netlog.json", work / "shot.png"
    command = [
        _chromium(),
        *FLAGS,
        *(["--no-sandbox"] if os.geteuid() == 0 else []),
        f"--user-data-dir={work / 'profile'}",  # fresh: no state from another run
        f"--proxy-server=http://127.0.0.1:{free_port()}",  # closed: nothing leaves loopback
        f"--log-net-log={netlog}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--screenshot={shot}",
        "--dump-dom",
        page.as_uri(),
    ]
    proc = subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return Opened(proc.stdout.decode(), shot.read_bytes(), _page_requests(netlog, page.as_uri()))


def _page_requests(netlog: Path, document: str) -> list[str]:
    """URLs of every request the page (not the browser itself) started."""
    log = json.loads(netlog.read_text(encoding="utf-8"))
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if event["type"] != start_job or "url" not in params:
            continue
        if params.get("initiator") == "not an origin":  # the browser's own traffic
            continue
        if params["url"] != document:
            urls.append(params["url"])
    return urls


def _png_size_and_colours(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the decoded scanlines) of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat, pos = b"", 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


async def test_load_report_renders_its_verdicts_and_chart_without_any_request(
    tmp_path: Path,
) -> None:
    page = tmp_path / "loadtest.html"
    async with serve_simulator(SimConfig(latency_scale=0.1)) as sim:
        command = [sys.executable, "-m", "exporter", "loadtest", "--base-url", sim.base_url]
        command += ["--model", "sim-cache-ok", "-n", "40", "-c", "4", "--format", "html"]
        proc = await anyio.run_process([*command, "-o", str(page)], check=False)
        assert proc.returncode == 0, proc.stderr.decode()
    opened = open_in_chromium(page, tmp_path / "chromium")
    assert opened.page_requests == []
    dom = parse(opened.dom)  # the document as Chromium built it
    verdicts = dom.by_id["verdicts"]
    assert "sim-cache-ok" in verdicts
    assert "works" in verdicts
    assert dom.count("svg") == 1
    assert dom.count("rect", "cold") == dom.count("rect", "warm") == 5
    assert "cold" in dom.by_id["statistics"]
    assert "warm" in dom.by_id["statistics"]
    width, height, colours = _png_size_and_colours(opened.screenshot)
    assert (width, height) == WINDOW
    assert colours > 32  # text, tables and bars, not a blank page


async def test_hostile_text_stays_text_and_the_check_sees_page_requests(tmp_path: Path) -> None:
    async with open_rig(SimConfig(latency_scale=1.0)) as rig:
        result = _hostile_result(await rig.probe("basic", "sim-cache-ok"))
    report = reports.ProbeReport(
        info=reports.ReportInfo(generated_at=GENERATED),
        provider_type="openai",
        base_url="http://127.0.0.1:8089/v1",
        model=HOSTILE_MODEL,
        exit_status=3,
        results=[result],
    )
    page = tmp_path / "probe.html"
    page.write_text(reports.render_probe("html", report), encoding="utf-8")
    opened = open_in_chromium(page, tmp_path / "hostile")
    assert opened.page_requests == []
    dom = parse(opened.dom)
    assert dom.count("img") == dom.count("script") == 0
    text = "".join(dom.text)
    assert HOSTILE_MODEL in text
    assert HOSTILE_ERROR in text
    assert "error" in dom.by_id["verdicts"]
    # The control: the same check on a page that does load something reports it.
    port = free_port()
    control = tmp_path / "control.html"
    control.write_text(
        f'<!DOCTYPE html><title>control</title><img src="http://127.0.0.1:{port}/x.png">',
        encoding="utf-8",
    )
    assert open_in_chromium(control, tmp_path / "control").page_requests == [
        f"http://127.0.0.1:{port}/x.png"
    ]
