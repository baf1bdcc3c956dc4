"""Hand an image from one node to another the way a live migration does.

The destination opens the image inactive (validated, shared lock, zero reads), the source
flushes and lets go, then the destination takes the write lock, drops its caches and reads
what the source wrote. Every step is visible in the nodes' traces and stats.

Run: python examples/handover.py [IMAGE]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import blockemu


def main(path: Path) -> None:
    blockemu.create_image(path, 16 << 20)
    source = blockemu.open_image(path)
    destination = blockemu.open_image(path, format="raw", active=False)
    destination.enable_trace()

    message = b"written by the source before the handover"
    source.write(0, message)
    try:
        destination.activate()
    except blockemu.LockError as e:
        print(f"destination cannot take over yet: {e}")

    source.inactivate()  # flush, then release the write lock
    destination.activate()  # take the lock, drop caches, allow I/O
    print("destination reads:", destination.read(0, len(message)).decode())

    try:
        source.write(0, b"late write")
    except blockemu.InactiveError as e:
        print(f"source refuses: {e}")

    print("destination stats:", destination.stats())
    for entry in destination.trace():
        print(f"  {entry['op']:<12} active={entry['active']!s:<5} {entry['outcome']}")
    source.close()
    destination.close()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp) / "handover.img")
