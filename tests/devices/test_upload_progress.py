"""Upload progress: what put/append report over local, ssh (a real sshd) and adb (the real client, a stand-in
server), how deploy's push_files meters each file, and what the meter prints in a log and on a terminal."""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from rich.console import Console

from plm_gguf.devices import transports
from plm_gguf.devices.deploy import probe, push_files
from plm_gguf.devices.meter import UploadMeter
from plm_gguf.devices.profiles import load_profile
from plm_gguf.devices.transports import LocalTransport, connect
from plm_gguf.errors import DeviceError

from . import adb_standin
from .adb_standin import AdbStandIn
from .conftest import _missing, write_profile

MIB = 1 << 20


@pytest.fixture()
def fast_reports(monkeypatch):
    monkeypatch.setattr(transports, "REPORT_INTERVAL", 0.02)


def _file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def _check_reports(reports: list[int], start: int, size: int) -> None:
    assert reports[0] == start and reports[-1] == size
    assert reports == sorted(reports), "progress went backwards"


def _ssh(sshd, profile_dir):
    write_profile(profile_dir, "t-ssh", 'install_dir = "~/x"\n[target]\ntoolchain = "native"\n' + sshd.transport_toml())
    return connect(load_profile("t-ssh"))


@contextmanager
def _slow_reader(fifo: Path, dest: Path, chunk: int, pause: float):
    """Read the FIFO into `dest`, `chunk` bytes per `pause` seconds: a device slower than the link."""
    def pump() -> None:
        with open(fifo, "rb") as src, open(dest, "wb") as out:
            while data := src.read(chunk):
                out.write(data)
                time.sleep(pause)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    yield
    thread.join(timeout=30)


def test_local_put_and_append_report_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(transports, "REPORT_INTERVAL", 0)
    src = _file(tmp_path / "model.gguf", 5 * MIB + 123)
    size = src.stat().st_size
    reports: list[int] = []
    LocalTransport().put(src, str(tmp_path / "out" / "put.bin"), report=reports.append)
    _check_reports(reports, 0, size)
    assert MIB in reports and len(set(reports)) >= 6  # one report per 1 MiB chunk
    (tmp_path / "resumed.bin").write_bytes(src.read_bytes()[: 2 * MIB])
    reports.clear()
    LocalTransport().append(src, str(tmp_path / "resumed.bin"), 2 * MIB, report=reports.append)
    _check_reports(reports, 2 * MIB, size)
    assert (tmp_path / "resumed.bin").read_bytes() == src.read_bytes()


@pytest.mark.ssh
def test_ssh_put_reports_the_bytes_ssh_read(sshd, profile_dir, tmp_path, fast_reports):
    """ssh reads the file itself; the report follows the offset it shares with us, up to the size."""
    src = _file(tmp_path / "model.gguf", 20 * MIB)
    fifo, dest = tmp_path / "device-end", tmp_path / "arrived.bin"
    os.mkfifo(fifo)
    reports: list[int] = []
    with _slow_reader(fifo, dest, MIB, 0.05):  # about 1 s for the whole file
        _ssh(sshd, profile_dir).put(src, str(fifo), report=reports.append)
    _check_reports(reports, 0, 20 * MIB)
    assert len({r for r in reports if 0 < r < 20 * MIB}) >= 3, reports
    assert dest.read_bytes() == src.read_bytes()


@pytest.mark.ssh
def test_ssh_append_reports_from_its_offset(sshd, profile_dir, tmp_path, fast_reports):
    src = _file(tmp_path / "model.gguf", 20 * MIB + 7)
    remote = tmp_path / "remote.partial"
    remote.write_bytes(src.read_bytes()[: 7 * MIB])
    reports: list[int] = []
    _ssh(sshd, profile_dir).append(src, str(remote), 7 * MIB, report=reports.append)
    _check_reports(reports, 7 * MIB, 20 * MIB + 7)
    assert remote.read_bytes() == src.read_bytes()


@pytest.mark.ssh
def test_a_stalled_ssh_upload_is_given_up(sshd, profile_dir, tmp_path, monkeypatch):
    """The device end never reads (a FIFO nobody opens): ssh stops reading the file, and the upload ends
    after STALL_TIMEOUT with a DeviceError instead of waiting out the whole copy timeout."""
    monkeypatch.setattr(transports, "STALL_TIMEOUT", 1.5)
    src = _file(tmp_path / "model.gguf", 48 * MIB)
    fifo = tmp_path / "never-read"
    os.mkfifo(fifo)
    began = time.monotonic()
    try:
        with pytest.raises(DeviceError, match=r"copy of model.gguf to .* stalled: nothing sent for 2 s") as err:
            _ssh(sshd, profile_dir).put(src, str(fifo))
        assert "reachable" in err.value.hint
        assert time.monotonic() - began < 30
    finally:  # let the remote `cat > fifo` open it and end
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))


@pytest.mark.adb
def test_adb_push_progress_from_the_real_client(tmp_path, profile_dir, monkeypatch, fast_reports):
    """adb prints "[ NN%]" only to a terminal: under a pty its percentages become bytes."""
    if not shutil.which("adb"):
        _missing("the adb client is not installed")
    recv = adb_standin._recv_exact

    def slow_recv(sock, n):  # a phone slower than loopback: about 1 s for the file
        time.sleep(0.002)
        return recv(sock, n)

    monkeypatch.setattr(adb_standin, "_recv_exact", slow_recv)
    src = _file(tmp_path / "model.gguf", 16 * MIB + 5)
    size = src.stat().st_size
    with AdbStandIn(tmp_path / "phone") as phone:
        for key, value in phone.env_for_client.items():
            monkeypatch.setenv(key, value)
        write_profile(profile_dir, "phone", f'extends = "rpi5"\ninstall_dir = "{phone.root}/x"\n'
                      f'[transport]\nkind = "adb"\nserial = "{phone.serial}"\n')
        reports: list[int] = []
        connect(load_profile("phone")).put(src, f"{phone.root}/model.gguf",
                                                                 report=reports.append)
        _check_reports(reports, 0, size)
        between = {r for r in reports if 0 < r < size}
        assert between and all(r in {p * size // 100 for p in range(100)} for r in between), reports
        assert (Path(phone.root) / "model.gguf").read_bytes() == src.read_bytes()
        with pytest.raises(DeviceError, match="adb push model.gguf failed"):
            connect(load_profile("phone")).put(src, f"{phone.root}/model.gguf/not-a-dir",
                                                                     report=reports.append)


def test_push_files_meters_each_upload(tmp_path, fast_reports):
    """push_files wraps each put/append in meter(name, size, offset) and hands its report to the transport."""
    profile = load_profile("host")
    facts = probe(profile)
    model = _file(tmp_path / "model.gguf", 3 * MIB)
    folder = tmp_path / "device"
    folder.mkdir()
    calls: list[tuple[str, int, int, list[int]]] = []

    @contextmanager
    def meter(name, size, offset):
        calls.append((name, size, offset, []))
        yield calls[-1][3].append

    (folder / ".model.gguf.partial").write_bytes(model.read_bytes()[:MIB])  # an interrupted upload
    push_files(LocalTransport(), str(folder), {"model.gguf": model}, set(), facts, lambda *_: None, meter)
    ((name, size, offset, reports),) = calls
    assert (name, size, offset) == ("model.gguf", 3 * MIB, MIB)
    _check_reports(reports, MIB, 3 * MIB)
    assert (folder / "model.gguf").read_bytes() == model.read_bytes()


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_meter_in_a_log_prints_lines_then_a_total():
    out, clock = io.StringIO(), _Clock()
    meter = UploadMeter(Console(file=out, force_terminal=False, width=200), clock=clock)
    with meter("model.gguf", 100 * MIB, 0) as report:
        for t, sent in ((0, 0), (1, 5 * MIB), (2, 12 * MIB), (3, 14 * MIB), (40, 15 * MIB), (50, 100 * MIB)):
            clock.now = 100 + t
            report(sent)
    assert out.getvalue().splitlines() == [
        "   put model.gguf  12.0 MiB of 100.0 MiB (12%)  6.0 MiB/s  15 s left",  # 10% more
        "   put model.gguf  15.0 MiB of 100.0 MiB (15%)  384.0 KiB/s  3 min 47 s left",  # 30 s later
        "  sent model.gguf  100.0 MiB in 50 s (2.0 MiB/s)",
    ]


def test_meter_a_resumed_upload_and_quiet_small_files():
    out, clock = io.StringIO(), _Clock()
    meter = UploadMeter(Console(file=out, force_terminal=False, width=200), clock=clock)
    with meter("llama-server", 1000, 0) as report:
        assert report is None  # a small file: nothing beyond deploy's `put` line
    with meter("model.gguf", 8 * MIB, 6 * MIB) as report:
        report(6 * MIB)
        clock.now += 4
        report(8 * MIB)
    assert out.getvalue() == "  sent model.gguf  2.0 MiB in 4.0 s (512.0 KiB/s, resumed at 6.0 MiB)\n"


def test_meter_on_a_terminal_draws_a_bar():
    out = io.StringIO()
    meter = UploadMeter(Console(file=out, force_terminal=True, width=120))
    with meter("model [q4].gguf", 10 * MIB, 2 * MIB) as report:
        report(6 * MIB)
        report(10 * MIB)
    text = out.getvalue()
    assert "model [q4].gguf" in text and "10.0/10.0 MiB" in text and "━" in text
