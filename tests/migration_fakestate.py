"""A stand-in for ``_core.save_state``/``load_state`` while the Rust encoding is not in this build.

It carries guest RAM only (devices' register state is not migrated), so tests that need a guest
driving devices across the migration skip with it; it validates like the real one (magic, digest,
section names, types and sizes) so the coordinator's failure paths can be tested.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from typing import Any

import blockemu
from blockemu import _core

MAGIC = b"FAKESTATE1"


def _save(devices: Sequence[tuple[str, Any]]) -> bytes:
    sections = []
    blobs = []
    for name, dev in devices:
        if isinstance(dev, blockemu.GuestMemory):
            data = dev.read(0, dev.size)
            sections.append([name, "ram", len(data)])
            blobs.append(data)
        else:
            sections.append([name, type(dev).__name__, 0])
    head = json.dumps(sections).encode()
    body = b"".join(blobs)
    digest = hashlib.sha256(head + body).digest()
    return MAGIC + struct.pack(">I", len(head)) + head + body + digest


def _load(devices: Sequence[tuple[str, Any]], data: bytes) -> None:
    data = bytes(data)
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4 + 32:
        raise blockemu.StateError("not a device state (bad magic)")
    (hl,) = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])
    head = data[len(MAGIC) + 4 : len(MAGIC) + 4 + hl]
    body = data[len(MAGIC) + 4 + hl : -32]
    if hashlib.sha256(head + body).digest() != data[-32:]:
        raise blockemu.StateError("device state digest mismatch")
    try:
        sections = json.loads(head)
    except ValueError as e:
        raise blockemu.StateError(f"bad section table: {e}") from None
    if len(sections) != len(devices):
        raise blockemu.StateError("section count differs")
    pos = 0
    plan = []
    for (name, kind, n), (dname, dev) in zip(sections, devices, strict=True):
        want = "ram" if isinstance(dev, blockemu.GuestMemory) else type(dev).__name__
        if name != dname or kind != want:
            raise blockemu.StateError(f"section {name}/{kind} does not match device {dname}")
        if kind == "ram":
            if n != dev.size:
                raise blockemu.StateError(f"RAM size {n} != {dev.size}")
            plan.append((dev, body[pos : pos + n]))
            pos += n
    if pos != len(body):
        raise blockemu.StateError("trailing bytes in device state")
    for dev, blob in plan:
        dev.write(0, blob)


def install_if_missing() -> bool:
    """Installs the stand-in when the build has no state encoding; True when it did."""
    if hasattr(_core, "save_state"):
        return False
    _core.save_state = _save  # type: ignore[attr-defined]
    _core.load_state = _load  # type: ignore[attr-defined]
    return True
