"""Two implementations of one virtio-mmio block device (the VirtioMmio protocol of
blockemu.drivers.virtio): QEMU's virtio-blk-device on the microvm machine driven through qtest,
and blockemu's VirtioBlk over a GuestMemory.

The same VirtioBlkDriver programs run over both; that is what makes the differential tests
meaningful.

QEMU notes (QEMU 7.2):
* ``-M microvm`` with ``virtio-mmio.force-legacy=false``: the first virtio-mmio slot answers at
  0xfeb02e00; guest RAM is at 0..64 MiB.
* ``-S`` keeps the CPU stopped; the main loop still completes AIO, so after a QueueNotify the
  driver polls used.idx (each poll is one qtest round trip, which lets the main loop run).
* Memory writes are queued and sent in one write together with the next command that needs an
  answer (every reply is read back in order): a request's descriptors, header and ring slots cost
  one round trip instead of one each.
* ``.irq`` is InterruptStatus != 0 (virtio-mmio's interrupt line is level-triggered on ISR).
"""

from __future__ import annotations

import os
import select
import subprocess
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import blockemu
from qtest import QTestError, QtestMemory

from peers import require_tool

MMIO_BASE = 0xFEB02E00
QEMU_RAM = 64 << 20
SERIAL = "EMU-VIRTIO-0001"
QUEUE_SIZE = 1024  # QEMU's QueueSizeMax


def blockemu_has_virtio() -> bool:
    return hasattr(blockemu, "VirtioBlk")


class QemuVirtio:
    """QEMU's virtio-blk-device (virtio-mmio v2) over ``image``, driven through qtest."""

    name = "qemu"

    def __init__(
        self,
        image: Path,
        *,
        serial: str = SERIAL,
        readonly: bool = False,
        extra_device: str = "",
        extra_drive: str = "",
        extra_args: Sequence[str] = (),
    ) -> None:
        qemu = require_tool("qemu-system-x86_64")
        self.image = image
        ro = ",readonly=on" if readonly else ""
        dev = f"virtio-blk-device,drive=d0,serial={serial}{extra_device}"
        self.proc = subprocess.Popen(
            [
                qemu,
                "-M",
                "microvm",
                "-m",
                "64M",
                "-display",
                "none",
                "-nodefaults",
                "-S",
                "-qtest",
                "stdio",
                "-qtest-log",
                "/dev/null",
                "-global",
                "virtio-mmio.force-legacy=false",
                "-drive",
                f"file={image},if=none,id=d0,format=raw{ro}{extra_drive}",
                "-device",
                dev,
                *extra_args,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        weakref.finalize(self, self.proc.kill)
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._buf = b""
        self._pending: list[str] = []
        self.memory = QtestMemory(self.cmd, QEMU_RAM, b64=True, send=self.post)
        self.closed = False

    # ------------------------------------------------------------------ qtest plumbing

    def _readline(self, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("QEMU did not answer")
            r, _, _ = select.select([self._fd], [], [], left)
            if not r:
                continue
            chunk = os.read(self._fd, 1 << 20)
            if not chunk:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise QTestError(f"QEMU exited: {err.strip()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def post(self, line: str) -> None:
        """Queues a command whose reply is only ``OK`` (sent with the next :meth:`batch`)."""
        self._pending.append(line)

    def batch(self, lines: Sequence[str]) -> list[str]:
        """Sends the queued lines and ``lines`` in one write; returns the replies to ``lines``."""
        assert self.proc.stdin is not None
        allines = self._pending + list(lines)
        self._pending = []
        if not allines:
            return []
        self.proc.stdin.write(("\n".join(allines) + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + 30
        replies: list[str] = []
        while len(replies) < len(allines):
            line = self._readline(deadline).decode()
            if line.startswith("IRQ"):
                continue
            if not line.startswith("OK"):
                raise QTestError(f"{allines[len(replies)][:80]!r}: {line}")
            replies.append(line[2:].strip())
        return replies[len(replies) - len(lines) :] if lines else []

    def cmd(self, line: str) -> str:
        return self.batch([line])[0]

    def flush_pending(self) -> None:
        if self._pending:
            self.batch([])

    # ------------------------------------------------------------------ the VirtioMmio protocol

    def mmio_read(self, offset: int, size: int = 4) -> int:
        w = {1: "b", 2: "w", 4: "l", 8: "q"}[size]
        return int(self.cmd(f"read{w} {MMIO_BASE + offset:#x}"), 16)

    def mmio_write(self, offset: int, value: int, size: int = 4) -> None:
        w = {1: "b", 2: "w", 4: "l", 8: "q"}[size]
        self.cmd(f"write{w} {MMIO_BASE + offset:#x} {value:#x}")

    @property
    def irq(self) -> bool:
        return self.mmio_read(0x060) != 0

    def wait_irq(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.irq:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.0005, max(0.0, deadline - time.monotonic())))

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.flush_pending()
        except (QTestError, TimeoutError, OSError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)

    def __enter__(self) -> QemuVirtio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockemuVirtio:
    """blockemu's VirtioBlk over ``image`` (opened with ``open_image``) and a 64 MiB
    GuestMemory, with QEMU's queue size and serial."""

    name = "blockemu"

    def __init__(
        self,
        image: Path,
        *,
        serial: str = SERIAL,
        readonly: bool = False,
        queue_size: int = QUEUE_SIZE,
        memory_size: int = QEMU_RAM,
        cache: str = "writeback",
        **kwargs: Any,
    ) -> None:
        self.image = image
        self.node = blockemu.open_image(str(image), readonly=readonly, cache=cache)
        self.memory = blockemu.GuestMemory(memory_size)
        self.dev = blockemu.VirtioBlk(
            self.node, self.memory, queue_size=queue_size, serial=serial, **kwargs
        )
        self.dev.start()
        # QEMU fixes the CHS geometry at realize; ours is prefetched after start().
        deadline = time.monotonic() + 10
        while getattr(self.dev, "geometry", True) is None and time.monotonic() < deadline:
            time.sleep(0.001)
        self.closed = False

    def mmio_read(self, offset: int, size: int = 4) -> int:
        return int(self.dev.mmio_read(offset, size))

    def mmio_write(self, offset: int, value: int, size: int = 4) -> None:
        self.dev.mmio_write(offset, value, size)

    @property
    def irq(self) -> bool:
        return bool(self.dev.irq)

    def wait_irq(self, timeout: float) -> bool:
        return bool(self.dev.wait_irq(timeout))

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.dev.stop()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.dev.stop()
        self.node.close()

    def __enter__(self) -> BlockemuVirtio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_image(path: Path, size: int, seed: int = 1) -> Path:
    """A raw image of pseudo-random bytes (reproducible from ``seed``)."""
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            k = min(left, 1 << 20)
            f.write(rng.randbytes(k))
            left -= k
    return path
