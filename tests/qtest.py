"""A minimal client of QEMU's qtest protocol: the judge of our device models.

QEMU runs with ``-qtest stdio``; each command line (``outb 0x70 0x1b``, ``inb 0x71``,
``readl ADDR``, ...) gets one ``OK [value]`` or ``FAIL ...`` line back.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from types import TracebackType

from peers import require_tool


class QTestError(RuntimeError):
    pass


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
