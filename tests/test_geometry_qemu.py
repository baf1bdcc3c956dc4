"""Our geometry against QEMU's own ide-hd (PC CMOS as SeaBIOS reads it), image by image.

QEMU writes each IDE hard disk's physical geometry into CMOS (0x1B.. for unit 0) and the BIOS
translation into 0x39; we compare those with guess_geometry on the same sector 0 and size.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import blockemu
from qtest import QTest

from peers import require_tool

TRANS_CODE = {"none": 0, "lba": 1, "large": 2, "rechs": 3}


def mbr(end_head: int, end_sector: int) -> bytes:
    sector = bytearray(512)
    entry = 0x1BE
    sector[entry + 1 : entry + 4] = bytes([1, 1, 0])  # start CHS 0/1/1
    sector[entry + 4] = 0x83
    sector[entry + 5] = end_head
    sector[entry + 6] = end_sector & 0x3F
    sector[entry + 7] = 0xFF
    sector[entry + 8 : entry + 12] = (63).to_bytes(4, "little")
    sector[entry + 12 : entry + 16] = (1000).to_bytes(4, "little")
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def qemu_cmos_geometry(image: Path) -> tuple[int, int, int, str]:
    with QTest(["-drive", f"file={image},format=raw,if=ide,index=0"]) as qt:
        b = [qt.cmos(0x1B + i) for i in range(9)]
        trans = {v: k for k, v in TRANS_CODE.items()}[qt.cmos(0x39) & 3]
    return b[0] | b[1] << 8, b[2], b[8], trans


CASES = [
    ("blank-30M", 30 << 20, None),
    ("blank-4G", 4 << 30, None),
    ("blank-20G", 20 << 30, None),
    ("mbr16-30M", 30 << 20, mbr(15, 63)),
    ("mbr16-4G", 4 << 30, mbr(15, 63)),
    ("mbr128-30M", 30 << 20, mbr(127, 63)),
    ("mbr255-4G", 4 << 30, mbr(254, 63)),
    ("mbr255-8G", 8 << 30, mbr(254, 63)),
    ("mbr-secs0-4G", 4 << 30, mbr(15, 0)),
]


@pytest.mark.parametrize(("size", "sector0"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_ide_geometry_matches_qemu(tmp_path: Path, size: int, sector0: bytes | None) -> None:
    qemu_img = require_tool("qemu-img")
    image = tmp_path / "disk.img"
    subprocess.run([qemu_img, "create", "-q", "-f", "raw", str(image), str(size)], check=True)
    if sector0 is not None:
        with open(image, "r+b") as f:
            f.write(sector0)
    ours = blockemu.guess_geometry(sector0, size // 512)
    assert (ours.cyls, ours.heads, ours.secs, ours.trans) == qemu_cmos_geometry(image)


def test_cli_geometry_on_an_sfdisk_table_matches_qemu(tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    sfdisk = require_tool("sfdisk")
    image = tmp_path / "parted.img"
    subprocess.run([qemu_img, "create", "-q", "-f", "raw", str(image), "2G"], check=True)
    subprocess.run(
        [sfdisk, "-q", str(image)], input="label: dos\n,512M,83\n,,7\n", text=True, check=True
    )
    r = subprocess.run(
        ["blockemu", "geometry", "--json", str(image)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    import json

    report = json.loads(r.stdout)
    g = report["geometry"]
    assert report["signature"] == "55aa"
    assert [p["type"] for p in report["partitions"][:2]] == [0x83, 0x07]
    assert (g["cyls"], g["heads"], g["secs"], g["trans"]) == qemu_cmos_geometry(image)
