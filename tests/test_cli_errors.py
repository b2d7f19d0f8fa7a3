"""Every command fails the way the README says: one line on stderr, a documented exit
status, never a traceback. Each case runs the real CLI as a process, against real sockets,
real files and a real pipe whose reader has gone.

Root ignores file permissions, so where a test needs an unreadable or unwritable path it
runs the command without the capabilities that bypass them (setpriv, util-linux); a
missing setpriv fails the test rather than skipping it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.clock import SystemClock
from exporter.store import Store
from tests.simulator_process import SimProcess, simulator
from tests.stream_lines import Lines

EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 1, 130, 141
PROVIDER = """
[[providers]]
name = "sim"
type = "openai"
base_url = "{url}"
api_key_env = ""
include = ["sim-cache-ok"]
isolation_delay = "0s"
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PCE_")}


def _cli(
    *args: str,
    stdout: int | None = subprocess.PIPE,
    drop_file_privileges: bool = False,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "exporter", *args]
    if drop_file_privileges and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to test permissions as root"
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command]
    return subprocess.run(
        command,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        timeout=timeout,
        check=False,
    )


def _one_line(proc: subprocess.CompletedProcess[str], status: int, starts: str) -> str:
    """The failure contract: ``status``, no traceback, exactly one line on stderr."""
    err = proc.stderr
    assert proc.returncode == status, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(starts), err
    return err.strip()


def _config(tmp_path: Path, *, listen: str = "127.0.0.1:0", db: str = "db.sqlite") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[server]\nlisten = "{listen}"\n[storage]\npath = "{tmp_path / db}"\n'
        + PROVIDER.format(url="http://127.0.0.1:9/v1")
    )
    return path


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another process (this one) is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def sim() -> Iterator[SimProcess]:
    with simulator() as handle:
        yield handle


def _closed_pipe() -> int:
    """The write end of a pipe whose reader is gone: the first write fails with EPIPE."""
    read, write = os.pipe()
    os.close(read)
    return write


# -- port in use ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_run_on_a_busy_port(tmp_path: Path, busy_port: int) -> None:
    # An existing database, as on any run but the first (a new one is announced at INFO).
    async with await Store.open(tmp_path / "db.sqlite", clock=SystemClock()):
        pass
    proc = _cli("run", "--config", str(_config(tmp_path, listen=f"127.0.0.1:{busy_port}")))
    line = _one_line(proc, EXIT_USAGE, "error: server.listen: ")
    assert line == (
        f"error: server.listen: cannot listen on 127.0.0.1:{busy_port}: address already in "
        "use: another process listens there"
    )


@pytest.mark.anyio
async def test_run_with_a_proxy_on_a_busy_port(tmp_path: Path, busy_port: int) -> None:
    async with await Store.open(tmp_path / "db.sqlite", clock=SystemClock()):
        pass
    config = _config(tmp_path)
    config.write_text(
        config.read_text()
        + f'[[proxies]]\nname = "app"\ntype = "openai"\nlisten = "127.0.0.1:{busy_port}"\n'
        'upstream = "http://127.0.0.1:9/v1"\n'
    )
    proc = _cli("run", "--config", str(config))
    line = _one_line(proc, EXIT_USAGE, "error: proxies.app.listen: ")
    assert line == (
        f"error: proxies.app.listen: cannot listen on 127.0.0.1:{busy_port}: address already "
        "in use: another process listens there"
    )


def test_simulate_on_a_busy_port(busy_port: int) -> None:
    proc = _cli("simulate", "--port", str(busy_port))
    line = _one_line(proc, EXIT_USAGE, "error: ")
    assert line == (
        f"error: cannot listen on 127.0.0.1:{busy_port}: address already in use: another "
        "process listens there"
    )


# -- unreadable config ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "check-config", "history"])
def test_unreadable_config(tmp_path: Path, command: str) -> None:
    config = _config(tmp_path)
    config.chmod(0)
    proc = _cli(command, "--config", str(config), drop_file_privileges=True)
    line = _one_line(proc, EXIT_USAGE, "error: ")
    assert line == f"error: cannot read config file {config}: Permission denied"


# -- unwritable storage -----------------------------------------------------------------------


def test_run_with_unwritable_storage(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)  # r-x: the database file cannot be created
    config = _config(tmp_path, db="locked/db.sqlite")
    proc = _cli("run", "--config", str(config), drop_file_privileges=True)
    line = _one_line(proc, EXIT_FAILURE, "error: storage.path: ")
    assert str(locked / "db.sqlite") in line
    assert "unable to open database file" in line


def test_run_with_storage_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("not a directory")
    proc = _cli("run", "--config", str(_config(tmp_path, db="plain-file/db.sqlite")))
    line = _one_line(proc, EXIT_FAILURE, "error: storage.path: ")
    assert "plain-file" in line


# -- broken pipe ------------------------------------------------------------------------------


def test_check_config_into_a_closed_pipe(tmp_path: Path) -> None:
    proc = _cli("check-config", "--config", str(_config(tmp_path)), stdout=_closed_pipe())
    _quiet_broken_pipe(proc)


@pytest.mark.anyio
async def test_history_into_a_closed_pipe(tmp_path: Path) -> None:
    config = _config(tmp_path)
    async with await Store.open(tmp_path / "db.sqlite", clock=SystemClock()):
        pass  # an empty history: the CSV header alone meets the closed pipe
    proc = _cli("history", "--config", str(config), stdout=_closed_pipe())
    _quiet_broken_pipe(proc)


def test_probe_into_a_closed_pipe_sends_nothing(sim: SimProcess, tmp_path: Path) -> None:
    before = sim.chat_requests()
    probe = ["probe", "--base-url", sim.base_url, "--model", "sim-cache-ok"]
    proc = _cli(*probe, "--evidence-dir", str(tmp_path), stdout=_closed_pipe())
    # One line: the warning that no key is set (the simulator needs none), then silence.
    assert proc.stderr.startswith("warning: PCE_API_KEY is not set"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.returncode == EXIT_BROKEN_PIPE
    # Nobody reads the result, so nothing is spent on it.
    assert sim.chat_requests() == before


def test_loadtest_into_a_closed_pipe_sends_nothing(sim: SimProcess) -> None:
    before = sim.chat_requests()
    load = ["loadtest", "--base-url", sim.base_url, "--model", "sim-cache-ok", "-n", "4"]
    proc = _cli(*load, "-c", "2", stdout=_closed_pipe())
    # The report comes only at the end, so the closed pipe is checked before anything is sent.
    _quiet_broken_pipe(proc)
    assert sim.chat_requests() == before


def test_loadtest_whose_reader_leaves_during_the_run(sim: SimProcess) -> None:
    load = ["loadtest", "--base-url", sim.base_url, "--model", "sim-cache-ok", "-n", "10"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", *load, "-c", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        err = Lines(proc.stderr)
        err.until("loadtest: 10 requests")  # announced: the requests are going out now
        proc.stdout.close()  # the reader goes away before the report is written
        assert proc.wait(60) == EXIT_BROKEN_PIPE
        lines = err.rest()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in "".join(lines), lines
    assert [line.split(":")[0] for line in lines] == ["warning", "loadtest"]


def _quiet_broken_pipe(proc: subprocess.CompletedProcess[str]) -> None:
    """A reader that stops early is not an error worth a message (as for `yes | head`)."""
    assert proc.returncode == EXIT_BROKEN_PIPE, proc.stderr
    assert proc.stderr == ""


# -- Ctrl-C -----------------------------------------------------------------------------------


def _interrupt(
    args: list[str], *, after: str, on_stderr: bool = False, timeout: float = 30
) -> tuple[int, str, str]:
    """Start the CLI, send SIGINT once ``after`` shows (on stdout, or stderr), and return
    (status, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        # Its own session, as a terminal's foreground job: SIGINT is not ignored there.
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        (err if on_stderr else out).until(after, timeout)
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout)
        return status, "".join(out.rest(timeout)), "".join(err.rest(timeout))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_during_a_probe(sim: SimProcess, tmp_path: Path) -> None:
    probe = ["probe", "--base-url", sim.base_url, "--model", "sim-cache-ok", "--probe", "ttl"]
    probe += ["--evidence-dir", str(tmp_path)]
    # Interrupted while it waits out the delay, after the prime's row has been shown.
    status, out, err = _interrupt([*probe, "--ttl-delays", "30s"], after="waiting 30")
    assert status == EXIT_INTERRUPTED
    assert "Traceback" not in err
    # The key warning, then the one line about the interruption.
    assert err.splitlines()[-1] == "interrupted", err
    assert len([line for line in err.splitlines() if not line.startswith("warning:")]) == 1
    rows = [line.split()[1:4] for line in out.splitlines() if line.lstrip()[:1].isdigit()]
    assert rows == [["prime", "for", "30s"]], out  # the repeat was never sent


def test_ctrl_c_stops_the_simulator_cleanly() -> None:
    status, out, err = _interrupt(["simulate", "--port", "0"], after="simulated models:")
    assert status == 0
    assert err == ""
    assert out.rstrip().endswith("simulator stopped")


def test_ctrl_c_stops_the_exporter_gracefully(tmp_path: Path) -> None:
    status, _, err = _interrupt(
        ["run", "--config", str(_config(tmp_path))], after="serving on", on_stderr=True
    )
    # SIGINT is the daemon's documented stop signal: a graceful exit 0.
    assert status == 0, err
    assert "Traceback" not in err
    assert "received SIGINT: stopping" in err
