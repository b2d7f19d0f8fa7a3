"""The proxies inside the real daemon: traffic series beside the probe series, and a marker
API key sent through a proxy appears nowhere in the log, /metrics, the store or error text."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.exporter_process import (
    ExporterProcess,
    config_text,
    probes_toml,
    sim_provider,
    value,
    wait_for,
)
from tests.simulator_process import SimProcess, simulator

pytestmark = pytest.mark.slow

MARKER = "sk-proxy-marker-7c1e9a2b5d"
SYSTEM = "Keep answers short. " * 300


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimProcess]:
    monkeypatch.setenv("SIM_KEY_FOR_TEST", MARKER)
    monkeypatch.setenv("SIM_API_KEY", MARKER)  # the probes' key: the same marker
    with simulator("--api-key-env", "SIM_KEY_FOR_TEST") as handle:
        yield handle


def _config(tmp_path: Path, sim: SimProcess) -> Path:
    providers = (
        sim_provider(sim.base_url, 'models = ["sim-cache-ok"]')
        + f"""
[[proxies]]
name = "sim"
type = "openai"
listen = "127.0.0.1:0"
upstream = "{sim.url}"
max_request_bytes = 65536

[[proxies]]
name = "nowhere"
type = "openai"
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:9"
"""
    )
    path = tmp_path / "config.toml"
    text = config_text(
        sim_url=sim.base_url,
        db_path=tmp_path / "db.sqlite",
        providers=providers,
        probes=probes_toml(basic="1s/900ms"),
    ).replace('log_level = "info"', 'log_level = "debug"')
    path.write_text(text)
    return path


def _proxy_url(exporter: ExporterProcess, name: str) -> str:
    assert wait_for(lambda: f"proxy {name} on http" in exporter.log(), 20), exporter.log()
    match = re.search(rf"proxy {name} on (http://\S+)", exporter.log())
    assert match
    return match.group(1)


def test_traffic_beside_probes_and_the_key_never_leaks(sim: SimProcess, tmp_path: Path) -> None:
    exporter = ExporterProcess(_config(tmp_path, sim)).start()
    texts: list[str] = []
    try:
        url = _proxy_url(exporter, "sim")
        client = openai.OpenAI(
            base_url=url + "/v1",
            api_key=MARKER,
            max_retries=0,
            http_client=httpx.Client(trust_env=False),
        )
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
        for _ in range(2):
            client.chat.completions.create(model="sim-cache-ok", messages=messages, max_tokens=5)
        stream = client.chat.completions.create(
            model="sim-cache-ok",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
        assert list(stream)[-1].usage is not None
        # Some APIs take the key in the query string: it goes upstream, and nowhere else.
        with_query = httpx.post(
            url + f"/v1/chat/completions?key={MARKER}",
            headers={"Authorization": f"Bearer {MARKER}"},
            json={"model": "sim-cache-ok", "messages": messages, "max_tokens": 5},
            timeout=30,
        )
        assert with_query.status_code == 200
        errors = []
        for call in (
            lambda: client.chat.completions.create(model="nope", messages=messages),
            # 100 KB over the proxy's 64 KiB limit: answered by the proxy itself.
            lambda: client.chat.completions.create(
                model="sim-cache-ok", messages=[{"role": "user", "content": "x " * 50_000}]
            ),
        ):
            with pytest.raises(openai.APIStatusError) as caught:
                call()
            errors.append(caught.value)
        assert [e.status_code for e in errors] == [404, 413]
        # A key in the query string, to a proxy whose upstream is down: 502 from the proxy.
        down = httpx.post(
            _proxy_url(exporter, "nowhere") + f"/v1/chat/completions?key={MARKER}",
            headers={"Authorization": f"Bearer {MARKER}", "x-api-key": MARKER},
            json={"model": "sim-cache-ok", "messages": messages},
            timeout=30,
        )
        assert down.status_code == 502
        texts += [str(e) for e in errors] + [e.response.text for e in errors] + [down.text]

        def traffic() -> float | None:
            return value(
                exporter.scrape(),
                "llmcache_traffic_requests_total",
                provider="sim",
                model="sim-cache-ok",
                outcome="success",
            )

        assert wait_for(lambda: traffic() == 4, 20), exporter.log()
        assert exporter.wait_for_verdict("sim-cache-ok"), exporter.log()
        samples = exporter.scrape()
        # The traffic and the probes of the same model, under the same labels.
        assert value(
            samples, "llmcache_traffic_cached_tokens_total", provider="sim", model="sim-cache-ok"
        )
        assert (
            value(
                samples, "llmcache_traffic_proxy_info", proxy="sim", provider="sim", type="openai"
            )
            == 1
        )
        assert (
            value(
                samples,
                "llmcache_traffic_requests_total",
                provider="nowhere",
                model="sim-cache-ok",
                outcome="proxy_error",
            )
            == 1
        )
        texts.append(httpx.get(exporter.url + "/metrics", timeout=10).text)
        texts.append(httpx.get(exporter.url + "/api/runs?limit=100", timeout=10).text)
        client.close()
        assert exporter.terminate() == 0
        texts.append(exporter.log())
    finally:
        exporter.kill()
    assert "proxy sim on http" in texts[-1]  # the log is the daemon's, at debug level
    for text in texts:
        assert MARKER not in text
    stored = list(tmp_path.glob("db.sqlite*"))
    assert stored
    for path in stored:
        assert MARKER.encode() not in path.read_bytes(), path
