"""Run a command where aarch64 programs execute as if native, without touching this machine.

``python -m plm_gguf.devices.namespace SPEC.json`` (as root) enters a new user namespace (every
uid and gid mapped to itself, so files keep their owners), a new mount namespace and a new pid
namespace, mounts a binfmt_misc instance of its own there (Linux 6.7 and later give each user
namespace its own) and registers qemu-aarch64 in it with the F flag (the interpreter is opened
now, so it need not exist inside a chroot). Nothing outside sees the registration or the mounts,
and when the namespace's first process ends the kernel ends every process in it: stopping leaves
nothing running and nothing registered.

SPEC (JSON) says what to run there:

- ``{"exec": [argv...]}``: run a command (building the root filesystem with mmdebstrap);
- ``{"machine": {...}}``: boot an emulated machine: overlay the cached root filesystem with a
  scratch layer, mount /proc (with recorded cpuinfo and meminfo bound over it), /dev, /sys, then
  start sshd inside it (chroot) and wait; SIGTERM stops it.

``"hostname"`` sets the host name the namespace's programs see.

Exit status: the command's; 97 means the namespaces or binfmt_misc could not be set up (the
first line of stderr says why). The parent learns readiness from a line on stdout.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x04000000, 0x10000000, 0x20000000
PR_SET_PDEATHSIG = 1
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
SETUP_FAILED = 97
BINFMT = "/proc/sys/fs/binfmt_misc"
# The aarch64 ELF header (little-endian, 64-bit, EM_AARCH64 = 183) and its mask, as
# qemu's own scripts/qemu-binfmt-conf.sh registers it.
AARCH64_MAGIC = r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
AARCH64_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def mount(source: str, target: str | Path, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    _check(_libc.mount(source.encode(), str(target).encode(), fstype.encode() if fstype else None,
                       ctypes.c_ulong(flags), data.encode() if data else None), f"mount {fstype or 'bind'} on {target}")


def bind(source: str | Path, target: str | Path, *, read_only: bool = True, recursive: bool = False) -> None:
    mount(str(source), target, None, MS_BIND | (MS_REC if recursive else 0))
    if read_only and not recursive:
        mount("", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def register_qemu(qemu: str) -> None:
    """A private binfmt_misc with qemu-aarch64 (flags F: opened now, C: setuid binaries keep their
    credentials, O: the binary is passed open)."""
    try:
        mount("binfmt_misc", BINFMT, "binfmt_misc")
    except SetupError as exc:
        raise SetupError(f"{exc} (binfmt_misc in a user namespace needs Linux 6.7 or later)") from None
    rule = f":qemu-aarch64:M::{AARCH64_MAGIC}:{AARCH64_MASK}:{qemu}:OCF"
    try:
        Path(BINFMT, "register").write_text(rule)
    except OSError as exc:
        raise SetupError(f"registering {qemu} with binfmt_misc failed: {exc.strerror}") from None


def enter_namespaces() -> None:
    """Unshare user, mount, uts (host name) and pid namespaces with an identity uid/gid map, written by a helper
    process in the parent namespace (a process cannot write its own map with full privilege)."""
    read_fd, write_fd = os.pipe()
    helper = os.fork()
    if helper == 0:  # waits until the parent has unshared, then writes its maps
        os.close(write_fd)
        os.read(read_fd, 1)
        parent = os.getppid()
        try:
            for name in ("uid_map", "gid_map"):
                Path(f"/proc/{parent}/{name}").write_text("0 0 4294967295\n")
            os._exit(0)
        except OSError:
            os._exit(1)
    os.close(read_fd)
    try:
        _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWPID),
               "unshare (user, mount, uts, pid namespaces)")
    finally:
        os.write(write_fd, b"x")
        os.close(write_fd)
    _, status = os.waitpid(helper, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SetupError("could not write the namespace's uid/gid maps (is this root?)")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _forward_signals(child: subprocess.Popen) -> None:
    def handler(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)


def _wait_reaping(child: subprocess.Popen) -> int:
    """As the pid namespace's init: reap every orphan until the main child ends."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return child.returncode if child.returncode is not None else 0
        except InterruptedError:
            continue
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return child.returncode


def boot(machine: dict) -> subprocess.Popen:
    """Mount the machine's filesystem (overlay on the cached image) and start its sshd, chrooted."""
    merged = Path(machine["merged"])
    mount("overlay", merged, "overlay", 0,
          f"lowerdir={machine['image']},upperdir={machine['upper']},workdir={machine['work']},userxattr")
    mount("proc", merged / "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for name, path in machine["proc"].items():  # recorded cpuinfo / meminfo over the host's
        bind(path, merged / "proc" / name)
    bind("/dev", merged / "dev", read_only=False, recursive=True)
    bind("/sys", merged / "sys", read_only=False, recursive=True)
    mount("tmpfs", merged / "run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    mount("tmpfs", merged / "tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    (merged / "run" / "sshd").mkdir(mode=0o755)

    def enter_root():
        os.chroot(merged)
        os.chdir("/")

    log = open(machine["log"], "ab")
    return subprocess.Popen(machine["argv"], preexec_fn=enter_root, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=log, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    try:
        enter_namespaces()
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return SETUP_FAILED
    init = os.fork()  # the first process in the new pid namespace
    if init:  # stays outside the pid namespace: passes SIGTERM in, returns its status
        signal.signal(signal.SIGTERM, lambda *_: os.kill(init, signal.SIGTERM))
        signal.signal(signal.SIGINT, lambda *_: os.kill(init, signal.SIGTERM))
        while True:
            try:
                _, status = os.waitpid(init, 0)
                return os.waitstatus_to_exitcode(status)
            except InterruptedError:
                continue
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # if the launcher is killed, the namespace ends with it
    try:
        if spec.get("hostname"):
            _check(_libc.sethostname(spec["hostname"].encode(), len(spec["hostname"])), "sethostname")
        mount("", "/", None, MS_REC | MS_PRIVATE)
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this pid namespace's
        register_qemu(spec["qemu"])
        if "exec" in spec:
            child = subprocess.Popen(spec["exec"])
        else:
            child = boot(spec["machine"])
    except (SetupError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        os._exit(SETUP_FAILED)
    _forward_signals(child)
    print("ready", flush=True)
    os._exit(_wait_reaping(child))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
