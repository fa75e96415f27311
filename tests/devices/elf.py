"""Just enough ELF reading to tell machine, static linking and stripping apart (no binutils needed)."""

from __future__ import annotations

import struct
from pathlib import Path

EM_AARCH64, EM_X86_64 = 183, 62
PT_INTERP, SHT_SYMTAB = 3, 2


def elf_summary(path: Path) -> dict:
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit little-endian ELF"
    machine = struct.unpack_from("<H", data, 18)[0]
    phoff, shoff = struct.unpack_from("<QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
    p_types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    s_types = [struct.unpack_from("<I", data, shoff + i * shentsize + 4)[0] for i in range(shnum)]
    return {"machine": machine, "static": PT_INTERP not in p_types, "stripped": SHT_SYMTAB not in s_types}
