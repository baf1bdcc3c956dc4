"""Scripted guest drivers: register-level programs that drive blockemu's emulated devices.

The drivers only speak the device's port protocol (the same calls a guest's ``in``/``out``
instructions become), so they run unchanged over blockemu's devices and over any other object
that offers the same methods — the differential tests run them against QEMU through qtest.
"""

from __future__ import annotations

from blockemu.drivers.ata import AtaChannel, AtaDriver, AtaError, BusMaster, Memory
from blockemu.drivers.virtio import (
    Request,
    RingLayout,
    Submitted,
    UsedElem,
    VirtioBlkDriver,
    VirtioError,
    VirtioMmio,
    VirtioNeedsReset,
    VirtioRequestError,
    VirtioTimeoutError,
)

__all__ = [
    "AtaChannel",
    "AtaDriver",
    "AtaError",
    "BusMaster",
    "Memory",
    "Request",
    "RingLayout",
    "Submitted",
    "UsedElem",
    "VirtioBlkDriver",
    "VirtioError",
    "VirtioMmio",
    "VirtioNeedsReset",
    "VirtioRequestError",
    "VirtioTimeoutError",
]
