"""A minimal client of QEMU's qtest protocol: the judge of our device models.

QEMU runs with ``-qtest stdio``; each command line (``outb 0x70 0x1b``, ``inb 0x71``,
``readl ADDR``, ...) gets one ``OK [value]`` or ``FAIL ...`` line back.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Callable, Sequence
from types import TracebackType

from peers import require_tool


class QTestError(RuntimeError):
    pass


class QtestMemory:
    """Guest RAM (``size`` bytes from address 0) of a QEMU driven through qtest.

    ``cmd`` sends one command and returns its reply after ``OK``. Writes go through ``send``
    (default ``cmd``; a target may pass a sender that queues them). With ``b64`` the bulk
    commands are ``b64read``/``b64write`` (1 MiB each; writes of up to 8 bytes stay ``write``),
    else the hex ``read``/``write`` (64 KiB each).
    """

    def __init__(
        self,
        cmd: Callable[[str], str],
        size: int,
        *,
        b64: bool = False,
        send: Callable[[str], object] | None = None,
    ) -> None:
        self._cmd = cmd
        self._send = cmd if send is None else send
        self._size = size
        self._b64 = b64
        self._chunk = 1 << 20 if b64 else 1 << 16

    @property
    def size(self) -> int:
        return self._size

    def read(self, addr: int, n: int) -> bytes:
        if n == 0:
            return b""
        out = bytearray()
        for pos in range(0, n, self._chunk):
            k = min(self._chunk, n - pos)
            if self._b64:
                out += base64.b64decode(self._cmd(f"b64read {addr + pos:#x} {k:#x}"))
            else:
                out += bytes.fromhex(self._cmd(f"read {addr + pos:#x} {k:#x}")[2:])
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        data = bytes(data)
        for pos in range(0, len(data), self._chunk):
            chunk = data[pos : pos + self._chunk]
            if self._b64 and len(chunk) > 8:
                b64 = base64.b64encode(chunk).decode()
                self._send(f"b64write {addr + pos:#x} {len(chunk):#x} {b64}")
            else:
                self._send(f"write {addr + pos:#x} {len(chunk):#x} 0x{chunk.hex()}")


class QTest:
    def __init__(self, args: Sequence[str], machine: str = "pc") -> None:
        qemu = require_tool("qemu-system-x86_64")
        self.proc = subprocess.Popen(
            [
                qemu,
                "-machine",
                machine,
                "-display",
                "none",
                "-nodefaults",
                # Debian's QEMU has no qtest accelerator: keep the (TCG) CPU stopped so that no
                # firmware races with our port accesses.
                "-S",
                "-qtest",
                "stdio",
                "-qtest-log",
                "/dev/null",
                *args,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def cmd(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        while True:
            reply = self.proc.stdout.readline()
            if not reply:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise QTestError(f"QEMU exited: {err.strip()}")
            if reply.startswith("IRQ"):  # asynchronous interrupt notifications
                continue
            if not reply.startswith("OK"):
                raise QTestError(f"{line!r}: {reply.strip()}")
            return reply[2:].strip()

    def outb(self, port: int, value: int) -> None:
        self.cmd(f"outb {port:#x} {value:#x}")

    def inb(self, port: int) -> int:
        return int(self.cmd(f"inb {port:#x}"), 16)

    def cmos(self, index: int) -> int:
        self.outb(0x70, index)
        return self.inb(0x71)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)

    def __enter__(self) -> QTest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
