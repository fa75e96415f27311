"""An emulated Raspberry Pi on this machine: rehearse a deployment before the hardware arrives.

The image is an arm64 Debian bookworm root filesystem (glibc 2.36, as Raspberry Pi OS bookworm
ships) with openssh-server and a user ``pi``, built once by mmdebstrap from Debian's archive
and cached like the builds (keyed, locked, renamed into place when complete). A running
machine is that image under a scratch overlay (every start is a fresh Pi; the image is never
written), in namespaces of its own (devices/namespace.py): qemu-aarch64 registered in a private
binfmt_misc, so sshd, the shell and llama.cpp run as aarch64 programs, no exec_wrapper; the
recorded /proc/cpuinfo and /proc/meminfo of the real board bound over the host's, so probe, the
CPU-feature checks and the memory plan see the Pi; and the login's QEMU_CPU set to the board's
core (cortex-a76 for a Pi 5), so a binary using an extension that core lacks dies with SIGILL
as it would on the board. Its sshd listens on a loopback port with a key made for it.

What differs from the board, by construction: the page size (qemu-user reports the host's 4 KiB,
a Pi 5 kernel uses 16 KiB), the number of CPUs programs may use (this machine's), speed, and
/proc/device-tree (x86 kernels have none, so no board model string).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from plm_gguf.cache import cache_dir
from plm_gguf.errors import DeviceError, UsageError
from plm_gguf.llama.build import cached_entry

from .namespace import SETUP_FAILED
from .profiles import TransportSpec

MACHINES_DIR = Path(__file__).parent / "machines"  # recorded /proc files of real boards
IMAGE_VERSION = 1
SUITE = "bookworm"
PACKAGES = ("openssh-server",)
MIRROR_ENV = "PLM_GGUF_DEBIAN_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
QEMU = "qemu-aarch64-static"
USER = "pi"
HOSTNAME = "raspberrypi"
READY_TIMEOUT = 90.0
UNREACHABLE = re.compile(r"Could not resolve|Temporary failure resolving|Failed to fetch|Could not connect|"
                         r"Connection refused|Unable to connect|No route to host|Network is unreachable", re.I)
Log = Callable[[str], None]


@dataclass(frozen=True)
class Machine:
    name: str
    description: str
    qemu_cpu: str  # the core qemu emulates for the user's programs
    profile: str  # the shipped profile whose builds run on it

    def recorded(self, what: str) -> Path:
        return MACHINES_DIR / f"{self.name}.{what}"


MACHINES = {
    "rpi5": Machine("rpi5", "Raspberry Pi 5, 8 GB (4x Cortex-A76)", "cortex-a76", "rpi5"),
    "rpi4": Machine("rpi4", "Raspberry Pi 4, 4 GB (4x Cortex-A72)", "cortex-a72", "rpi4"),
}


@dataclass(frozen=True)
class Emulated:
    """A running emulated machine, as recorded in its state file."""

    machine: str
    port: int
    pid: int  # the namespace launcher's
    user: str
    identity: str  # the client key for its sshd
    known_hosts: str  # its host key, for [127.0.0.1]:port
    folder: str  # its run folder (scratch layer, keys, logs)

    @property
    def address(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def transport(self) -> TransportSpec:
        return TransportSpec(kind="ssh", host="127.0.0.1", port=self.port, user=self.user, identity_file=self.identity,
                             known_hosts=self.known_hosts)


def machine(name: str) -> Machine:
    if name not in MACHINES:
        raise UsageError(f"no emulated machine {name!r}", f"choose one of: {', '.join(MACHINES)}")
    return MACHINES[name]


def root_dir() -> Path:
    return cache_dir() / "emulate"


def require_host(*, building: bool) -> str:
    """What running (and building) an emulated machine needs here; returns the qemu path."""
    if os.geteuid() != 0:
        raise DeviceError("the emulated Pi needs root: it mounts its filesystem and registers qemu with binfmt_misc, "
                          "in namespaces of its own", "run it as root (sudo), or run aarch64 builds through "
                          'exec_wrapper = ["qemu-aarch64-static"] in a local profile')
    qemu = shutil.which(QEMU)
    if not qemu:
        raise DeviceError(f"{QEMU} is not installed", "apt-get install qemu-user-static")
    if building:
        missing = [tool for tool in ("mmdebstrap", "arch-test") if not shutil.which(tool)]
        if missing:
            raise DeviceError(f"building the emulated Pi's image needs {' and '.join(missing)}",
                              "apt-get install mmdebstrap arch-test")
    return qemu


def _namespace(spec: dict, folder: Path, log_file: Path, **popen) -> subprocess.Popen:
    spec_file = folder / "namespace.json"
    spec_file.write_text(json.dumps(spec))
    log = open(log_file, "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "plm_gguf.devices.namespace", str(spec_file)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, **popen)
    finally:
        log.close()


def _setup_failure(log_file: Path) -> DeviceError:
    said = next((l[len("error: "):] for l in log_file.read_text(errors="replace").splitlines()
                 if l.startswith("error: ")), "unknown")
    return DeviceError(f"could not set up the emulated Pi's namespaces: {said}",
                       f"it needs root and Linux 6.7 or later (this is {os.uname().release}): a binfmt_misc of "
                       "its own in a user namespace")


# ------------------------------------------------------------------------------------ the image

def image_key() -> str:
    recipe = json.dumps([IMAGE_VERSION, SUITE, "arm64", "minbase", PACKAGES, USER, HOSTNAME])
    return f"{SUITE}-arm64-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def image(log: Log | None = None) -> Path:
    """The cached root filesystem (built by mmdebstrap the first time, a few minutes)."""
    log = log or (lambda line: None)
    entry = root_dir() / "images" / image_key()
    if (entry / "image.json").is_file():
        return entry
    qemu = require_host(building=True)
    mirror = os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
    with cached_entry(entry, lambda e: (e / "image.json").is_file()) as staging:
        if staging is None:
            return entry
        log(f"building the arm64 Debian {SUITE} image from {mirror} (once; a few minutes)")
        start = time.monotonic()
        log_file = cache_dir() / "logs" / f"emulate-image-{entry.name}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("")
        argv = ["mmdebstrap", "--mode=root", "--arch=arm64", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                "--skip=chroot/mount/sys",  # sysfs cannot be mounted in a user namespace; nothing here needs it
                *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("man", "doc", "locale", "info")),
                f"--customize-hook=chroot \"$1\" useradd --create-home --shell /bin/bash --uid 1000 --password '*' {USER}",
                f"--customize-hook=echo {HOSTNAME} > \"$1/etc/hostname\"",
                "--customize-hook=rm -f \"$1\"/etc/ssh/ssh_host_*",  # each start makes its own host key
                SUITE, str(staging / "rootfs"), mirror]
        proc = _namespace({"qemu": qemu, "exec": argv}, staging, log_file)
        try:
            code = proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        if code == SETUP_FAILED:
            raise _setup_failure(log_file)
        if code != 0:
            text = log_file.read_text(errors="replace")
            if UNREACHABLE.search(text):
                raise DeviceError(f"the Debian archive at {mirror} is unreachable",
                                  f"check the network, or set {MIRROR_ENV} to a Debian mirror this machine reaches "
                                  f"(the log is {log_file})")
            last = [l for l in text.splitlines() if l.strip()][-1:] or ["no output"]
            raise DeviceError(f"building the emulated Pi's image failed (mmdebstrap exit {code}): {last[0][:300]}",
                              f"see {log_file}")
        facts = {"suite": SUITE, "packages": list(PACKAGES), "mirror": mirror, "glibc": _glibc(staging / "rootfs"),
                 "seconds": round(time.monotonic() - start, 1)}
        (staging / "image.json").write_text(json.dumps(facts, indent=2) + "\n")
        log(f"image built in {facts['seconds']} s (glibc {facts['glibc']})")
    return entry


def _glibc(rootfs: Path) -> str:
    status = (rootfs / "var/lib/dpkg/status").read_text(errors="replace")
    found = re.search(r"^Package: libc6\n(?:.+\n)*?Version: (\d+\.\d+)", status, re.M)
    return found.group(1) if found else "unknown"


# -------------------------------------------------------------------------- running machines

def _run_dir(name: str) -> Path:
    return root_dir() / "run" / name


def _alive(state: Emulated) -> bool:
    try:
        cmdline = Path(f"/proc/{state.pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"plm_gguf.devices.namespace" in cmdline and state.folder.encode() in cmdline


def running(name: str) -> Emulated | None:
    """The machine if it is running (a state file whose launcher is gone is removed)."""
    state_file = _run_dir(name) / "state.json"
    try:
        state = Emulated(**json.loads(state_file.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if _alive(state):
        return state
    _clean(Path(state.folder))
    return None


def all_running() -> list[Emulated]:
    return [m for m in (running(name) for name in MACHINES) if m]


def for_address(host: str, port: int) -> Emulated | None:
    """The running emulated machine that serves ssh at host:port here, if any."""
    if host not in ("127.0.0.1", "localhost"):
        return None
    return next((m for m in all_running() if m.port == port), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keys(folder: Path, upper: Path, port: int) -> tuple[Path, Path]:
    """A host key and a client key made for this start; the Pi's files go into the scratch layer."""
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"plm-gguf emulated {name}",
                        "-f", str(folder / name)], check=True, stdin=subprocess.DEVNULL)
    host_pub = (folder / "host_key.pub").read_text().split()
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    ssh = upper / "etc" / "ssh"
    ssh.mkdir(parents=True)
    shutil.copy(folder / "host_key", ssh / "ssh_host_ed25519_key")
    shutil.copy(folder / "host_key.pub", ssh / "ssh_host_ed25519_key.pub")
    return folder / "client_key", known_hosts


def _user_files(upper: Path, m: Machine, folder: Path) -> None:
    home = upper / "home" / USER
    dot_ssh = home / ".ssh"
    dot_ssh.mkdir(parents=True, mode=0o700)
    shutil.copy(folder / "client_key.pub", dot_ssh / "authorized_keys")
    # sshd passes this to the login (PermitUserEnvironment); qemu reads it at every exec
    (dot_ssh / "environment").write_text(f"QEMU_CPU={m.qemu_cpu}\n")
    for path in (home, dot_ssh, dot_ssh / "authorized_keys", dot_ssh / "environment"):
        os.chown(path, 1000, 1000)
    (upper / "home").chmod(0o755)
    home.chmod(0o755)
    (dot_ssh / "authorized_keys").chmod(0o600)


def _sshd_config(upper: Path, port: int) -> str:
    path = "/etc/ssh/plm_gguf_sshd_config"
    (upper / path.lstrip("/")).write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey /etc/ssh/ssh_host_ed25519_key\n"
        "UsePAM no\nPermitUserEnvironment QEMU_CPU\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin no\nMaxStartups 50\nMaxSessions 50\n"
        "Subsystem sftp internal-sftp\nLogLevel INFO\n")
    return path


def start(name: str, *, port: int = 0, log: Log | None = None) -> Emulated:
    """Start the emulated machine (building its image the first time); if it runs, return it."""
    m = machine(name)
    log = log or (lambda line: None)
    already = running(name)
    if already:
        if port and port != already.port:
            raise UsageError(f"the emulated {name} already runs on port {already.port}",
                             f"stop it first: plm-gguf devices emulate {name} --stop")
        return already
    qemu = require_host(building=False)
    entry = image(log)
    folder = _run_dir(name)
    _clean(folder)
    upper, work, merged = folder / "upper", folder / "work", folder / "merged"
    for path in (upper, work, merged):
        path.mkdir(parents=True)
    folder.chmod(0o700)
    port = port or _free_port()
    identity, known_hosts = _keys(folder, upper, port)
    _user_files(upper, m, folder)
    config = _sshd_config(upper, port)
    spec = {"qemu": qemu, "hostname": HOSTNAME, "machine": {
        "image": str(entry / "rootfs"), "upper": str(upper), "work": str(work), "merged": str(merged),
        "proc": {"cpuinfo": str(m.recorded("cpuinfo")), "meminfo": str(m.recorded("meminfo"))},
        "log": str(folder / "sshd.log"), "argv": ["/usr/sbin/sshd", "-D", "-e", "-f", config]}}
    log_file = folder / "namespace.log"
    # its own session: a Ctrl-C in this terminal later does not stop it; `--stop` does
    proc = _namespace(spec, folder, log_file, start_new_session=True)
    state = Emulated(name, port, proc.pid, USER, str(identity), str(known_hosts), str(folder))
    (folder / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
    try:
        _wait_ready(proc, state, log_file)
    except BaseException:
        stop(name)
        raise
    log(f"emulated {m.description} is up at {state.address}")
    return state


def _wait_ready(proc: subprocess.Popen, state: Emulated, log_file: Path) -> None:
    """Until sshd answers with a login that runs aarch64 programs."""
    from .transports import SshTransport

    deadline = time.monotonic() + READY_TIMEOUT
    transport = SshTransport(state.transport())
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            if code == SETUP_FAILED:
                raise _setup_failure(log_file)
            sshd_log = Path(state.folder, "sshd.log")
            said = (sshd_log.read_text(errors="replace").strip().splitlines() if sshd_log.exists() else [])[-1:]
            raise DeviceError(f"the emulated Pi stopped as it started (exit {code}): {(said or ['no output'])[0][:300]}",
                              f"see {sshd_log}")
        try:
            socket.create_connection(("127.0.0.1", state.port), timeout=1).close()
        except OSError:
            time.sleep(0.2)
            continue
        result = transport.run("uname -m", timeout=30, check=False)
        if result.ok and result.stdout.strip() == "aarch64":
            return
        time.sleep(0.5)
    raise DeviceError(f"the emulated Pi did not answer on port {state.port} within {READY_TIMEOUT:.0f} s",
                      f"see {Path(state.folder, 'sshd.log')}")


def stop(name: str) -> bool:
    """Stop the machine: every process in it ends, its mounts go with it, its scratch layer is removed.
    False when it was not running."""
    machine(name)
    folder = _run_dir(name)
    state_file = folder / "state.json"
    try:
        state = Emulated(**json.loads(state_file.read_text()))
    except (OSError, ValueError, TypeError):
        _clean(folder)
        return False
    was_running = _alive(state)
    if was_running:
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _alive(state) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(state):
            os.kill(state.pid, signal.SIGKILL)  # its pid namespace's init dies with it (PDEATHSIG)
            time.sleep(0.2)
    _clean(folder)
    return was_running


def _clean(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)


def stop_all() -> list[str]:
    return [name for name in MACHINES if stop(name)]
