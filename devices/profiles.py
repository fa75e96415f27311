"""Device profiles: one TOML file per device, shipped with the package or added by the user.

Lookup order for a name: the user's profile folder (``plm-gguf devices list`` prints it), then
the profiles shipped in ``plm_gguf/devices/profiles``. A path to a ``.toml`` file is loaded
as is. A profile may say ``extends = "rpi5"`` to take another profile and change a few keys.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
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
TOOLCHAINS = ("zig", "ndk", "native")


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
    toolchain: str  # zig | ndk | native
    triple: str = ""  # aarch64-linux-musl, aarch64-linux-gnu
    glibc: str = ""  # with a -gnu triple: the glibc version to link against, e.g. "2.36"
    mcpu: str = ""  # zig's CPU name (cortex_a76, generic, cortex_a76+i8mm)
    uses: tuple[str, ...] = ()  # /proc/cpuinfo features the build may execute

    @property
    def arch(self) -> str:
        return self.triple.split("-", 1)[0] if self.triple else ""

    @property
    def libc(self) -> str:
        if self.toolchain == "ndk":
            return "bionic"
        if self.toolchain == "native":
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
    source: str = ""  # the file it came from
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"profile file not found: {path}", "check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"profile {path} is not valid TOML: {exc}", "fix the file") from None


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
    if toolchain != "native" and not target.get("triple"):
        raise UsageError(f"{where}: target.triple is missing", "e.g. triple = \"aarch64-linux-musl\"")
    if "install_dir" not in data:
        raise UsageError(f"{where}: install_dir is missing", "e.g. install_dir = \"~/plm-gguf\"")
    try:
        tspec = TransportSpec(
            kind=kind,
            host=str(transport.get("host", "")),
            user=str(transport.get("user", "")),
            port=int(transport.get("port", 0)),
            known_hosts=str(transport.get("known_hosts", "")),
            identity_file=str(transport.get("identity_file", "")),
            ssh_config=str(transport.get("ssh_config", "")),
            options=tuple(str(o) for o in transport.get("options", ())),
            serial=str(transport.get("serial", "")),
        )
        gspec = TargetSpec(
            toolchain=toolchain,
            triple=str(target.get("triple", "")),
            glibc=str(target.get("glibc", "")),
            mcpu=str(target.get("mcpu", "")),
            uses=tuple(str(f) for f in target.get("uses", ())),
        )
        wrapper = data.get("exec_wrapper", ())
        wrapper = tuple(wrapper.split()) if isinstance(wrapper, str) else tuple(wrapper)
        return Profile(
            name=name,
            description=str(data.get("description", "")),
            transport=tspec,
            target=gspec,
            install_dir=str(data["install_dir"]),
            threads=int(data.get("threads", 0)),
            ctx=int(data.get("ctx", 2048)),
            headroom_mib=int(data.get("headroom_mib", 256)),
            exec_wrapper=wrapper,
            source=str(path),
            raw=data,
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: a value has the wrong type: {exc}", "compare with a shipped profile") from None


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
    from dataclasses import replace

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
