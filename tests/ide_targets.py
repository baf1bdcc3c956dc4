"""Two implementations of one IDE channel's port protocol (the AtaChannel/BusMaster protocol of
blockemu.drivers.ata): QEMU's own IDE model driven through qtest, and blockemu's IdeChannel.

The same register-level programs and the same AtaDriver run over both; that is what makes the
differential tests meaningful.

QEMU notes:
* Debian's QEMU has no qtest accelerator, so QEMU runs with ``-S`` (the TCG CPU stays stopped).
* Asynchronous AIO completes in QEMU's main loop while it waits for our next line, so polling
  Alternate Status until BSY clears observes completion.
* QEMU handles every complete line of one read() of its input before its main loop runs again
  (qtest reads up to 1 KiB at a time). Batches below that size are therefore atomic with respect
  to AIO completions: the bulk data-port helpers use that to stop exactly at a DRQ block's end.
* ``irq_intercept_in ioapic`` makes QEMU print ``IRQ raise 14`` / ``IRQ lower 14`` as the line
  changes; we track the level from those lines (they arrive before the reply of the command
  during which the change happened).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import blockemu
from qtest import QTestError, QtestMemory

from peers import require_tool

CMD_BASE = 0x1F0
CTRL_PORT = 0x3F6
IRQ_LINE = 14
BM_BASE = 0xC000  # I/O address we give BAR4 of the PIIX3 IDE function
PIIX_IDE_CFG = 0x8000_0000 | (1 << 11) | (1 << 8)  # bus 0, device 1, function 1
QEMU_MEMORY = 16 << 20  # the part of guest RAM programs use (QEMU's pc has 128 MiB)
BATCH_BYTES = 1000  # stays below qtest's 1 KiB read chunk: a batch is atomic w.r.t. AIO

DATA_OUT_OPCODES = frozenset({0x30, 0x31, 0x34, 0x39, 0x3C, 0xC5})
DMA_OPCODES = frozenset({0x06, 0x25, 0x35, 0xC8, 0xC9, 0xCA, 0xCB})


def copy_image(src: Path, dst: Path) -> Path:
    """A sparse copy of ``src``."""
    cp = shutil.which("cp")
    if cp is not None:
        subprocess.run([cp, "--sparse=always", str(src), str(dst)], check=True)
    else:  # pragma: no cover
        shutil.copyfile(src, dst)
    return dst


def make_image(path: Path, size: int) -> Path:
    qemu_img = require_tool("qemu-img")
    subprocess.run([qemu_img, "create", "-q", "-f", "raw", str(path), str(size)], check=True)
    return path


class QemuIde:
    """The primary IDE channel of QEMU's ``pc`` machine (PIIX3), master = ``image``."""

    name = "qemu"

    def __init__(self, image: Path, extra_args: Sequence[str] = ()) -> None:
        qemu = require_tool("qemu-system-x86_64")
        self.image = image
        self.proc = subprocess.Popen(
            [
                qemu,
                "-M",
                "pc",
                "-nodefaults",
                "-display",
                "none",
                "-S",
                "-qtest",
                "stdio",
                "-qtest-log",
                "/dev/null",
                "-drive",
                f"file={image},if=ide,format=raw,index=0",
                *extra_args,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # Never leave a QEMU behind (qtest does not exit when its input closes).
        weakref.finalize(self, self.proc.kill)
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._buf = b""
        self._irq = False
        self.irq_events: list[bool] = []
        self.last_command: int | None = None
        self.memory = QtestMemory(self.cmd, QEMU_MEMORY)
        self.closed = False
        self.cmd("irq_intercept_in ioapic")
        # PIIX3 IDE (00:01.1): BAR4 = bus-master block, command register = I/O + bus master.
        self._cfg_write(0x20, BM_BASE | 1, 4)
        self._cfg_write(0x04, 0x0005, 2)

    # ------------------------------------------------------------------ qtest plumbing

    def _readline(self, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("QEMU did not answer")
            r, _, _ = select.select([self._fd], [], [], left)
            if not r:
                continue
            chunk = os.read(self._fd, 65536)
            if not chunk:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise QTestError(f"QEMU exited: {err.strip()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def batch(self, lines: Sequence[str]) -> list[str]:
        """Sends ``lines`` in one write and returns the replies (``OK`` stripped)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(("\n".join(lines) + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + 30
        replies: list[str] = []
        while len(replies) < len(lines):
            line = self._readline(deadline).decode()
            if line.startswith("IRQ"):
                _, what, num = line.split()
                if int(num) == IRQ_LINE:
                    self._irq = what == "raise"
                    self.irq_events.append(self._irq)
                continue
            if not line.startswith("OK"):
                raise QTestError(f"{lines[len(replies)]!r}: {line}")
            replies.append(line[2:].strip())
        return replies

    def cmd(self, line: str) -> str:
        return self.batch([line])[0]

    def _in(self, width: str, port: int) -> int:
        return int(self.cmd(f"in{width} {port:#x}"), 16)

    def _out(self, width: str, port: int, value: int) -> None:
        self.cmd(f"out{width} {port:#x} {value:#x}")

    def _cfg_write(self, reg: int, value: int, size: int) -> None:
        self._out("l", 0xCF8, PIIX_IDE_CFG | (reg & 0xFC))
        self._out({1: "b", 2: "w", 4: "l"}[size], 0xCFC + (reg & 3), value)

    def _cfg_read(self, reg: int, size: int) -> int:
        self._out("l", 0xCF8, PIIX_IDE_CFG | (reg & 0xFC))
        return self._in({1: "b", 2: "w", 4: "l"}[size], 0xCFC + (reg & 3))

    # ------------------------------------------------------------------ the channel protocol

    def ioport_read(self, offset: int, size: int = 1) -> int:
        return self._in({1: "b", 2: "w", 4: "l"}[size], CMD_BASE + offset)

    def ioport_write(self, offset: int, value: int, size: int = 1) -> None:
        if offset == 7 and size == 1:
            # Remember the command only if the device takes it (not busy, no DRQ, present).
            st = self.ctrl_read()
            if not st & 0x88 and st != 0:
                self.last_command = value & 0xFF
        self._out({1: "b", 2: "w", 4: "l"}[size], CMD_BASE + offset, value)

    def ctrl_read(self) -> int:
        return self._in("b", CTRL_PORT)

    def ctrl_write(self, value: int) -> None:
        self._out("b", CTRL_PORT, value)

    @property
    def irq(self) -> bool:
        return self._irq

    def wait_irq(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._irq:
            if time.monotonic() >= deadline:
                break
            self.ctrl_read()  # lets QEMU's main loop run; IRQ lines arrive with the reply
        return self._irq

    def bmdma_read(self, offset: int, size: int = 1) -> int:
        return self._in({1: "b", 2: "w", 4: "l"}[size], BM_BASE + offset)

    def bmdma_write(self, offset: int, value: int, size: int = 1) -> None:
        self._out({1: "b", 2: "w", 4: "l"}[size], BM_BASE + offset, value)

    def insw_paired(self, nwords: int) -> list[int]:
        """Reads up to ``nwords`` data words, stopping after the word that ended the DRQ block
        (Alternate Status read after each word shows DRQ clear or BSY)."""
        words: list[int] = []
        per_batch = BATCH_BYTES // 20
        while len(words) < nwords:
            k = min(per_batch, nwords - len(words))
            lines: list[str] = []
            for _ in range(k):
                lines += [f"inw {CMD_BASE:#x}", f"inb {CTRL_PORT:#x}"]
            replies = self.batch(lines)
            for i in range(k):
                words.append(int(replies[2 * i], 16))
                st = int(replies[2 * i + 1], 16)
                if st & 0x80 or not st & 0x08:
                    return words
        return words

    def outsw_paired(self, words: Sequence[int]) -> int:
        """Writes data words until the DRQ block ends; returns how many were sent."""
        done = 0
        # Each word costs up to 28 bytes ("outw 0x1f0 0xffff\ninb 0x3f6\n"): a larger batch
        # spans two qtest reads, and a write completing in between lets the batch's
        # remaining words land in the next DRQ block.
        per_batch = BATCH_BYTES // 28
        while done < len(words):
            chunk = words[done : done + per_batch]
            lines: list[str] = []
            for w in chunk:
                lines += [f"outw {CMD_BASE:#x} {w:#x}", f"inb {CTRL_PORT:#x}"]
            replies = self.batch(lines)
            for i in range(len(chunk)):
                done += 1
                st = int(replies[2 * i + 1], 16)
                if st & 0x80 or not st & 0x08:
                    return done
        return done

    def read_data(self, nbytes: int) -> bytes:
        if self.last_command in DATA_OUT_OPCODES or self.last_command in DMA_OPCODES:
            return b""
        if not self.ctrl_read() & 0x08:
            return b""
        words = self.insw_paired(nbytes // 2)
        return b"".join(w.to_bytes(2, "little") for w in words)

    def write_data(self, data: bytes) -> int:
        if self.last_command not in DATA_OUT_OPCODES:
            return 0
        if not self.ctrl_read() & 0x08:
            return 0
        data = bytes(data)
        words = [int.from_bytes(data[i : i + 2], "little") for i in range(0, len(data) - 1, 2)]
        return 2 * self.outsw_paired(words)

    def start(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)

    def __enter__(self) -> QemuIde:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def blockemu_has_ide() -> bool:
    return hasattr(blockemu, "IdeChannel") and hasattr(blockemu, "IdeDisk")


class BlockemuIde:
    """blockemu's IdeChannel with ``image`` as master and a bus master over GuestMemory."""

    name = "blockemu"

    def __init__(
        self,
        image: Path,
        memory_size: int = QEMU_MEMORY,
        *,
        readonly: bool = False,
        **disk_kwargs: Any,
    ) -> None:
        be: Any = blockemu
        self.image = image
        self.node = blockemu.open_image(image, format="raw", readonly=readonly)
        self.memory = blockemu.GuestMemory(memory_size)
        self.disk = be.IdeDisk(self.node, **disk_kwargs)
        self.channel = be.IdeChannel(self.disk, memory=self.memory)
        self.channel.start()
        self.last_command: int | None = None
        self.closed = False

    def ioport_read(self, offset: int, size: int = 1) -> int:
        return int(self.channel.ioport_read(offset, size))

    def ioport_write(self, offset: int, value: int, size: int = 1) -> None:
        if offset == 7 and size == 1:
            st = self.channel.ctrl_read()
            if not st & 0x88 and st != 0:
                self.last_command = value & 0xFF
        self.channel.ioport_write(offset, value, size)

    def ctrl_read(self) -> int:
        return int(self.channel.ctrl_read())

    def ctrl_write(self, value: int) -> None:
        self.channel.ctrl_write(value)

    @property
    def irq(self) -> bool:
        return bool(self.channel.irq)

    def wait_irq(self, timeout: float) -> bool:
        return bool(self.channel.wait_irq(timeout))

    def bmdma_read(self, offset: int, size: int = 1) -> int:
        return int(self.channel.bmdma_read(offset, size))

    def bmdma_write(self, offset: int, value: int, size: int = 1) -> None:
        self.channel.bmdma_write(offset, value, size)

    def read_data(self, nbytes: int) -> bytes:
        return bytes(self.channel.read_data(nbytes))

    def write_data(self, data: bytes) -> Any:
        return self.channel.write_data(data)

    # The bulk helpers must stop exactly at the end of a DRQ block, as QEMU's atomic batches
    # do. A word-by-word loop here would race with the device's background completion (the next
    # block may be ready before we look at the status), so they use read_data/write_data, which
    # by contract move at most the rest of the current block, and mirror what QEMU's word loop
    # records when nothing moves.

    def insw_paired(self, nwords: int) -> list[int]:
        if nwords <= 0:
            return []
        data = bytes(self.channel.read_data(2 * nwords))
        if data:
            return [data[i] | data[i + 1] << 8 for i in range(0, len(data) - 1, 2)]
        st = self.channel.ctrl_read()
        if st & 0x08 and not st & 0x80:  # a data-out or DMA phase: each read returns 0
            return [0] * nwords
        return [0]  # no DRQ: one read returns 0 and the loop stops

    def outsw_paired(self, words: Sequence[int]) -> int:
        if not words:
            return 0
        data = b"".join((w & 0xFFFF).to_bytes(2, "little") for w in words)
        moved = self.channel.write_data(data)
        n = len(data) if moved is None else int(moved)
        if n:
            return n // 2
        st = self.channel.ctrl_read()
        if st & 0x08 and not st & 0x80:  # a data-in or DMA phase: every write is ignored
            return len(words)
        return 1

    def start(self) -> None:
        self.channel.start()

    def drain(self) -> None:
        """Waits for in-flight backend work and its completions (the channel stays usable)."""
        self.channel.stop()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.channel.stop()
        finally:
            self.node.close()

    def __enter__(self) -> BlockemuIde:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
