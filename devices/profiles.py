"""Device profiles: one TOML file per device, shipped with the package or added by the user.

Lookup order for a name: the user's profile folder (``plm-gguf devices list`` prints it), then
the profiles shipped in ``plm_gguf/devices/profiles``. A path to a ``.toml`` file is loaded
as is. A profile may say ``extends = "rpi5"`` to take another profile and change a few keys.

Every file is checked when it is read: each key against the type :data:`SCHEMA` gives it, an
unknown key named. ``install_dir`` must be a folder of its own (deploy writes there, undeploy
removes from there): not ``/``, not the home folder itself, no ``..``, no control characters. A
leading ``~`` or ``$HOME`` is the device's home; a relative path is taken under it too.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import platformdirs

from plm_gguf.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SHIPPED_DIR = Path(__file__).parent / "profiles"
TRANSPORT_KINDS = ("ssh", "adb", "local")
TOOLCHAINS = ("zig", "ndk", "native", "cuda")
HOST_TOOLCHAINS = ("native", "cuda")  # builds of this machine's own llama.cpp tree (plm_gguf.llama.host)

STR, INT, STRS, STR_OR_STRS = "a string", "an integer", "a list of strings", "a string or a list of strings"
TYPE_CHECKS = {
    STR: lambda v: isinstance(v, str),
    INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
    STRS: lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    STR_OR_STRS: lambda v: isinstance(v, str) or TYPE_CHECKS[STRS](v),
}
# What each key of a profile file must be; a dict is a [table] with its own keys.
SCHEMA: dict[str, Any] = {
    "extends": STR, "description": STR, "install_dir": STR, "threads": INT, "ctx": INT, "headroom_mib": INT,
    "exec_wrapper": STR_OR_STRS, "gpu_layers": INT,
    "transport": {"kind": STR, "host": STR, "user": STR, "port": INT, "known_hosts": STR, "identity_file": STR,
                  "ssh_config": STR, "options": STRS, "serial": STR},
    "target": {"toolchain": STR, "triple": STR, "glibc": STR, "mcpu": STR, "uses": STRS, "ndk": STR, "cuda_arch": STR},
}
CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")  # a newline, NUL, ...: never part of a path plm-gguf writes
HOME_VAR = re.compile(r"^\$(?:HOME|\{HOME\})(?=/|$)")
INSTALL_DIR_HINT = "choose a folder of its own that plm-gguf may fill and empty, such as ~/plm-gguf"


def user_profile_dir() -> Path:
    """Where users add their own device profiles (PLM_GGUF_PROFILES overrides)."""
    override = os.environ.get("PLM_GGUF_PROFILES")
    if override:
        return Path(override)
    return Path(platformdirs.user_config_dir("plm-gguf")) / "devices"


@dataclass(frozen=True)
class TransportSpec:
    kind: str
    host: str = ""  # ssh: host name or ~/.ssh/config alias
    user: str = ""
    port: int = 0
    known_hosts: str = ""  # ssh: a known_hosts file to check the host key against
    identity_file: str = ""
    ssh_config: str = ""  # ssh: -F FILE instead of ~/.ssh/config
    options: tuple[str, ...] = ()  # ssh: extra -o KEY=VALUE
    serial: str = ""  # adb: -s SERIAL


@dataclass(frozen=True)
class TargetSpec:
    toolchain: str  # zig | ndk | native | cuda
    triple: str = ""  # aarch64-linux-musl, aarch64-linux-gnu
    glibc: str = ""  # with a -gnu triple: the glibc version to link against, e.g. "2.36"
    mcpu: str = ""  # zig's CPU name (cortex_a76, generic, cortex_a76+i8mm)
    uses: tuple[str, ...] = ()  # /proc/cpuinfo features the build may execute
    cuda_arch: str = ""  # cuda: the GPU architecture ("90"); empty: the device's GPU, probed

    @property
    def arch(self) -> str:
        return self.triple.split("-", 1)[0] if self.triple else ""

    @property
    def libc(self) -> str:
        if self.toolchain == "ndk":
            return "bionic"
        if self.toolchain in HOST_TOOLCHAINS:
            return "host"
        return f"gnu.{self.glibc}" if "gnu" in self.triple else "musl"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    transport: TransportSpec
    target: TargetSpec
    install_dir: str
    threads: int = 0
    ctx: int = 2048
    headroom_mib: int = 256
    exec_wrapper: tuple[str, ...] = ()
    gpu_layers: int = 0  # layers llama.cpp offloads to the GPU (-ngl); 0: none, 999: all
    source: str = ""  # the file it came from
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"profile file not found: {path}", "check the path") from None
    except OSError as exc:
        raise UsageError(f"profile {path} cannot be read: {exc.strerror}", "check the path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"profile {path} is not valid TOML: {exc}", "fix the file") from None
    _check_types(data, SCHEMA, path)
    return data


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return next((n for t, n in names.items() if isinstance(value, t)), "a date or time")


def _check_types(data: dict[str, Any], schema: dict[str, Any], path: Path, prefix: str = "") -> None:
    """Each key known and of its type, or a UsageError naming the file, the key and the type expected."""
    for key, value in data.items():
        name, expected = prefix + key, schema.get(key)
        if expected is None:
            raise UsageError(f"profile {path}: unknown key {name!r}",
                             f"the keys{f' of [{prefix[:-1]}]' if prefix else ''} are: {', '.join(schema)}")
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise UsageError(f"profile {path}: {name} has the wrong type: expected a table, got {_type_name(value)}",
                                 f"write it as a [{name}] section")
            _check_types(value, expected, path, f"{name}.")
        elif not TYPE_CHECKS[expected](value):
            raise UsageError(f"profile {path}: {name} has the wrong type: expected {expected}, got {_type_name(value)}",
                             "compare with a shipped profile (`plm-gguf devices show rpi5`)")


def _install_dir_problem(path: str) -> str:
    """What makes `path` unsafe as a folder plm-gguf fills and empties ('' when nothing)."""
    if not path.strip():
        return "is empty"
    if CONTROL_CHAR.search(path):
        return "contains a control character (a newline, NUL, ...)"
    if "$" in path:
        return "names a variable: only a leading ~ or $HOME is expanded"
    if path.startswith("~") and path != "~" and not path.startswith("~/"):
        return "starts with ~user: only ~/ is expanded"
    parts = path.split("/")
    if ".." in parts:
        return "climbs out of its folder with '..'"
    below = [p for p in (parts[1:] if path.startswith("~") else parts) if p not in ("", ".")]  # under / or ~
    if not below:
        return "is the root folder" if path.startswith("/") else "is the home folder itself"
    return ""


def check_install_dir(value: str, where: str) -> str:
    """The install_dir with a leading $HOME written as ~, or a UsageError saying what makes it unsafe."""
    path = HOME_VAR.sub("~", value)
    problem = _install_dir_problem(path)
    if problem:
        raise UsageError(f"{where}: install_dir {value!r} {problem}", INSTALL_DIR_HINT)
    return path


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _find(name: str, skip: tuple[str, ...] = ()) -> Path | None:
    for folder in (user_profile_dir(), SHIPPED_DIR):
        candidate = folder / f"{name}.toml"
        if candidate.is_file() and str(candidate) not in skip:
            return candidate
    return None


def _load_raw(name_or_path: str, seen: tuple[str, ...] = ()) -> tuple[str, Path, dict[str, Any]]:
    """A user profile that extends its own name (rpi5 extends "rpi5") takes the shipped one as base."""
    as_path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        path, name = as_path, as_path.stem
    else:
        found = _find(name_or_path, seen)
        if found is None:
            raise UsageError(
                f"unknown device profile {name_or_path!r}",
                f"known: {', '.join(list_profiles())}; add one as {user_profile_dir()}/NAME.toml",
            )
        path, name = found, name_or_path
    if str(path) in seen:
        raise UsageError(f"profile {path} extends itself", "break the `extends` cycle")
    data = _read_toml(path)
    parent = data.pop("extends", None)
    if parent:
        _, _, base = _load_raw(str(parent), seen + (str(path),))
        base.pop("description", None)
        data = _merge(base, data)
    return name, path, data


def _build(name: str, path: Path, data: dict[str, Any]) -> Profile:
    where = f"profile {name} ({path})"
    transport = dict(data.get("transport") or {})
    target = dict(data.get("target") or {})
    kind = transport.get("kind", "")
    if kind not in TRANSPORT_KINDS:
        raise UsageError(f"{where}: transport.kind {kind!r} is unknown", f"use one of {TRANSPORT_KINDS}")
    toolchain = target.get("toolchain", "")
    if target.get("ndk") == "auto" and os.environ.get("ANDROID_NDK_HOME"):
        # Android profiles: a bionic build when an NDK is at hand; it carries every CPU variant
        # and picks one at run time, so it needs only the armv8-a baseline.
        toolchain = "ndk"
        target.update(triple="aarch64-linux-android", uses=["fp", "asimd"], mcpu="")
    if toolchain not in TOOLCHAINS:
        raise UsageError(f"{where}: target.toolchain {toolchain!r} is unknown", f"use one of {TOOLCHAINS}")
    if toolchain not in HOST_TOOLCHAINS and not target.get("triple"):
        raise UsageError(f"{where}: target.triple is missing", "e.g. triple = \"aarch64-linux-musl\"")
    if "install_dir" not in data:
        raise UsageError(f"{where}: install_dir is missing", "e.g. install_dir = \"~/plm-gguf\"")
    tspec = TransportSpec(
        kind=kind,
        host=transport.get("host", ""),
        user=transport.get("user", ""),
        port=transport.get("port", 0),
        known_hosts=transport.get("known_hosts", ""),
        identity_file=transport.get("identity_file", ""),
        ssh_config=transport.get("ssh_config", ""),
        options=tuple(transport.get("options", ())),
        serial=transport.get("serial", ""),
    )
    gspec = TargetSpec(
        toolchain=toolchain,
        triple=target.get("triple", ""),
        glibc=target.get("glibc", ""),
        mcpu=target.get("mcpu", ""),
        uses=tuple(target.get("uses", ())),
        cuda_arch=target.get("cuda_arch", ""),
    )
    wrapper = data.get("exec_wrapper", ())
    wrapper = tuple(wrapper.split()) if isinstance(wrapper, str) else tuple(wrapper)
    return Profile(
        name=name,
        description=data.get("description", ""),
        transport=tspec,
        target=gspec,
        install_dir=check_install_dir(data["install_dir"], where),
        threads=data.get("threads", 0),
        ctx=data.get("ctx", 2048),
        headroom_mib=data.get("headroom_mib", 256),
        exec_wrapper=wrapper,
        gpu_layers=data.get("gpu_layers", 0),
        source=str(path),
        raw=data,
    )


def load_profile(name_or_path: str) -> Profile:
    """A profile by name (user folder first, then shipped) or by path to a TOML file."""
    return _build(*_load_raw(name_or_path))


def list_profiles() -> list[str]:
    names = {p.stem for p in SHIPPED_DIR.glob("*.toml")}
    folder = user_profile_dir()
    if folder.is_dir():
        names |= {p.stem for p in folder.glob("*.toml")}
    return sorted(names)


def with_overrides(profile: Profile, *, address: str = "", exec_wrapper: str | None = None) -> Profile:
    """The profile with the transport address (ssh [user@]host[:port], adb serial) replaced."""
    tspec = profile.transport
    if address:
        if tspec.kind == "ssh":
            user, _, hostport = address.rpartition("@")
            host, _, port = hostport.partition(":")
            tspec = replace(tspec, host=host, user=user or tspec.user, port=int(port) if port else tspec.port)
        elif tspec.kind == "adb":
            tspec = replace(tspec, serial=address)
        else:
            raise UsageError("a local device has no address", "drop --address")
    wrapper = profile.exec_wrapper if exec_wrapper is None else tuple(exec_wrapper.split())
    return replace(profile, transport=tspec, exec_wrapper=wrapper)
