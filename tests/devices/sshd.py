"""A throwaway OpenSSH server on 127.0.0.1 for the tests (Debian's openssh-server, run as is)."""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SshServer:
    port: int
    user: str
    identity: Path  # the client's private key
    known_hosts: Path  # holds the server's host key for [127.0.0.1]:port
    ssh_config: Path  # an empty client config, so the tester's ~/.ssh/config cannot interfere
    process: subprocess.Popen

    def transport_toml(self) -> str:
        return (f'[transport]\nkind = "ssh"\nhost = "127.0.0.1"\nport = {self.port}\nuser = "{self.user}"\n'
                f'identity_file = "{self.identity}"\nknown_hosts = "{self.known_hosts}"\nssh_config = "{self.ssh_config}"\n')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sshd(folder: Path) -> SshServer:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    port = _free_port()
    host_pub = (folder / "host_key.pub").read_text().split()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    (folder / "ssh_config").write_text("")
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nMaxStartups 50\nMaxSessions 50\n"
        "Subsystem sftp internal-sftp\nLogLevel ERROR\n"
    )
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(folder / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(folder / "sshd.log", "wb"))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {(folder / 'sshd.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return SshServer(port, getpass.getuser(), folder / "client_key", folder / "known_hosts", folder / "ssh_config", proc)


def stop_sshd(server: SshServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
