"""A stand-in adb *server* for tests: the real `adb` client talks to it over loopback.

Point the client at it with ``ADB_SERVER_SOCKET=tcp:127.0.0.1:PORT``. It answers the host
services the client uses (version, devices, features, transport selection, forward) and the
device services shell (v2: separate stdout/stderr and the exit code) and sync (STAT, SEND,
RECV). Commands run under /bin/sh in a sandbox folder that stands for the phone; a `getprop`
script there makes it answer like Android. Nothing here is a mock of plm-gguf's code: the
transport under test is the unmodified adb client.
"""

from __future__ import annotations

import os
import socket
import socketserver
import struct
import subprocess
import threading
from pathlib import Path

ADB_SERVER_VERSION = 41
FEATURES = "shell_v2,cmd"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("client closed")
        buf += chunk
    return buf


def _hexstr(payload: str | bytes) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return b"%04x" % len(data) + data


class _Handler(socketserver.BaseRequestHandler):
    server: "AdbStandIn"

    def handle(self) -> None:
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                length = int(_recv_exact(sock, 4), 16)
                request = _recv_exact(sock, length).decode()
                if not self._host(sock, request):
                    break
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the client hangs on a close without shutdown
            except OSError:
                pass

    def _host(self, sock: socket.socket, request: str) -> bool:
        """Handle one request; True when the connection carries another request."""
        serial = self.server.serial
        self.server.log.append(request)
        for prefix in (f"host-serial:{serial}:", "host-usb:", "host-local:", "host:"):
            if request.startswith(prefix):
                return self._host_service(sock, request[len(prefix):])
        if request.startswith("host-serial:"):
            sock.sendall(b"FAIL" + _hexstr(f"device '{request.split(':')[1]}' not found"))
            return False
        return self._device_service(sock, request)

    def _host_service(self, sock: socket.socket, service: str) -> bool:
        serial = self.server.serial
        if service == "version":
            sock.sendall(b"OKAY" + _hexstr("%04x" % ADB_SERVER_VERSION))
        elif service in ("devices", "devices-l"):
            sock.sendall(b"OKAY" + _hexstr(f"{serial}\tdevice\n"))
        elif service == "features":
            sock.sendall(b"OKAY" + _hexstr(FEATURES))
        elif service in ("tport:any", f"tport:serial:{serial}"):
            sock.sendall(b"OKAY" + struct.pack("<q", 1))
            return True
        elif service in ("transport-any", f"transport:{serial}"):
            sock.sendall(b"OKAY")
            return True
        elif service.startswith("tport:serial:") or service.startswith("transport:"):
            sock.sendall(b"FAIL" + _hexstr(f"device '{service.rsplit(':', 1)[1]}' not found"))
        elif service.startswith("forward:"):
            spec = service[len("forward:"):].removeprefix("norebind:")
            local, remote = spec.split(";")
            self.server.forward(int(local.split(":")[1]), int(remote.split(":")[1]))
            sock.sendall(b"OKAYOKAY")
        elif service.startswith("killforward:"):
            self.server.kill_forward(int(service.split(":")[-1]))
            sock.sendall(b"OKAYOKAY")
        elif service == "kill":
            sock.sendall(b"OKAY")
        else:
            sock.sendall(b"FAIL" + _hexstr(f"unsupported host service {service}"))
        return False

    def _device_service(self, sock: socket.socket, service: str) -> bool:
        if service.startswith("shell"):
            options, _, command = service.partition(":")
            sock.sendall(b"OKAY")
            self._shell(sock, command, v2="v2" in options.split(","))
        elif service == "sync:":
            sock.sendall(b"OKAY")
            self._sync(sock)
        else:
            sock.sendall(b"FAIL" + _hexstr(f"unsupported service {service}"))
        return False

    # -- shell ------------------------------------------------------------------------------
    def _shell(self, sock: socket.socket, command: str, v2: bool) -> None:
        proc = subprocess.Popen(["/bin/sh", "-c", command or "true"], cwd=self.server.root, env=self.server.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lock = threading.Lock()

        def pump(stream, packet_id: int) -> None:
            for chunk in iter(lambda: stream.read1(65536), b""):
                with lock:
                    sock.sendall(struct.pack("<BI", packet_id, len(chunk)) + chunk if v2 else chunk)

        threads = [threading.Thread(target=pump, args=(proc.stdout, 1)), threading.Thread(target=pump, args=(proc.stderr, 2))]
        for t in threads:
            t.start()
        threading.Thread(target=self._drain, args=(sock,), daemon=True).start()
        for t in threads:
            t.join()
        code = proc.wait()
        if v2:
            sock.sendall(struct.pack("<BIB", 3, 1, code & 0xFF))

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        """Read and drop what the client sends (stdin packets, window size) until it closes."""
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass

    # -- sync -------------------------------------------------------------------------------
    def _path(self, remote: str) -> Path:
        return Path(remote) if os.path.isabs(remote) else Path(self.server.root) / remote

    def _sync(self, sock: socket.socket) -> None:
        while True:
            ident, length = struct.unpack("<4sI", _recv_exact(sock, 8))
            if ident == b"QUIT":
                return
            arg = _recv_exact(sock, length).decode()
            if ident == b"STAT":
                try:
                    st = os.stat(self._path(arg))
                    sock.sendall(b"STAT" + struct.pack("<III", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime)))
                except OSError:
                    sock.sendall(b"STAT" + struct.pack("<III", 0, 0, 0))
            elif ident == b"SEND":
                self._receive_file(sock, arg)
            elif ident == b"RECV":
                self._send_file(sock, arg)
            else:
                sock.sendall(b"FAIL" + struct.pack("<I", 11) + b"unsupported")
                return

    def _receive_file(self, sock: socket.socket, arg: str) -> None:
        path_text, _, mode_text = arg.rpartition(",")
        target = self._path(path_text)
        error = ""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            out = open(target, "wb")
        except OSError as exc:
            out, error = None, str(exc)
        while True:
            ident, length = struct.unpack("<4sI", _recv_exact(sock, 8))
            if ident == b"DATA":
                data = _recv_exact(sock, length)
                if out:
                    out.write(data)
            elif ident == b"DONE":  # length carries the mtime
                break
            else:
                error = f"unexpected {ident!r}"
                break
        if out:
            out.close()
            os.chmod(target, int(mode_text) & 0o777 if mode_text else 0o644)
        if error:
            sock.sendall(b"FAIL" + struct.pack("<I", len(error)) + error.encode())
        else:
            sock.sendall(b"OKAY" + struct.pack("<I", 0))

    def _send_file(self, sock: socket.socket, arg: str) -> None:
        try:
            with open(self._path(arg), "rb") as fh:
                for chunk in iter(lambda: fh.read(65536), b""):
                    sock.sendall(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
            sock.sendall(b"DONE" + struct.pack("<I", 0))
        except OSError as exc:
            msg = str(exc).encode()
            sock.sendall(b"FAIL" + struct.pack("<I", len(msg)) + msg)


class AdbStandIn(socketserver.ThreadingTCPServer):
    """Start with ``with AdbStandIn(root) as server:``; ``server.env_for_client`` sets ADB_SERVER_SOCKET."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path, serial: str = "standin-0001", android_release: str = "14") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = str(root)
        self.serial = serial
        self.log: list[str] = []
        self._forwards: dict[int, socket.socket] = {}
        bindir = Path(root) / ".standin-bin"
        bindir.mkdir(parents=True, exist_ok=True)
        getprop = bindir / "getprop"
        getprop.write_text(f'#!/bin/sh\n[ "$1" = ro.build.version.release ] && echo {android_release}\n'
                           '[ "$1" = ro.product.model ] && echo "adb stand-in"\nexit 0\n')
        getprop.chmod(0o755)
        self.env = {**os.environ, "HOME": self.root, "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def env_for_client(self) -> dict[str, str]:
        return {"ADB_SERVER_SOCKET": f"tcp:127.0.0.1:{self.port}"}

    def __enter__(self) -> "AdbStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for port in list(self._forwards):
            self.kill_forward(port)
        self.shutdown()
        self.server_close()

    # -- forward: listen on the host port, relay to the device port (both on loopback) -------
    def forward(self, local: int, remote: int) -> None:
        if local == remote:
            raise OSError("stand-in shares loopback with the device: forwarded ports must differ")
        listener = socket.create_server(("127.0.0.1", local))
        self._forwards[local] = listener
        threading.Thread(target=self._accept, args=(listener, remote), daemon=True).start()

    def kill_forward(self, local: int) -> None:
        listener = self._forwards.pop(local, None)
        if listener:
            listener.close()

    @staticmethod
    def _accept(listener: socket.socket, remote: int) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", remote))
            except OSError:
                return
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        for chunk in iter(lambda: src.recv(65536), b""):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
