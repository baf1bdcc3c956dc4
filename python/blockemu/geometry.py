"""The report of :func:`blockemu.explain_geometry` (``blockemu geometry IMAGE``): its shape,
and a human-readable rendering of it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict

__all__ = ["GeometryFields", "GeometryReport", "PartitionEntryReport", "format_report"]


class GeometryFields(TypedDict):
    cyls: int
    heads: int
    secs: int
    trans: Literal["none", "lba", "large", "rechs"]


class PartitionEntryReport(TypedDict):
    """One of the four MBR entries, fields as stored (C/H/S unpacked)."""

    index: int
    bootable: bool
    type: int
    start_chs: tuple[int, int, int]
    end_chs: tuple[int, int, int]
    start_lba: int
    sectors: int


class GeometryReport(TypedDict):
    """What :func:`blockemu.explain_geometry` returns; JSON-ready as it is."""

    device: Literal["ide-hd", "virtio-blk", "scsi-hd"]
    total_sectors: int
    geometry: GeometryFields
    #: cyls x heads x secs: the sectors CHS addressing reaches.
    chs_sectors: int
    source: Literal[
        "user", "mbr", "mbr-many-heads", "no-boot-sector", "no-signature", "no-acceptable-entry"
    ]
    #: One sentence saying why the geometry is what it is.
    reason: str
    #: The partition entry that decided, if one did.
    entry: int | None
    translation_source: Literal["user", "auto", "no-slot"]
    #: Bytes 510-511 of sector 0 in hex ("55aa" for an MBR), None without a sector 0.
    signature: str | None
    #: The four entries when sector 0 is an MBR, else empty.
    partitions: list[PartitionEntryReport]


# Names of the partition types a reader is most likely to meet; others show as hex only.
_PARTITION_TYPES = {
    0x01: "FAT12",
    0x04: "FAT16 <32M",
    0x05: "Extended",
    0x06: "FAT16",
    0x07: "NTFS/exFAT",
    0x0B: "FAT32",
    0x0C: "FAT32 LBA",
    0x0E: "FAT16 LBA",
    0x0F: "Extended LBA",
    0x82: "Linux swap",
    0x83: "Linux",
    0x8E: "Linux LVM",
    0xA5: "FreeBSD",
    0xEE: "GPT protective",
    0xEF: "EFI system",
    0xFD: "Linux RAID",
}


def _size(sectors: int) -> str:
    size = float(sectors * 512)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _chs(chs: Sequence[int]) -> str:
    return "/".join(str(part) for part in chs)


def _partition_lines(partitions: Sequence[PartitionEntryReport], decided: int | None) -> list[str]:
    lines = [
        f"  {'#':<2} {'boot':<5}{'type':<22}{'start C/H/S':<14}{'end C/H/S':<14}"
        f"{'start LBA':>12}{'sectors':>12}"
    ]
    for entry in partitions:
        index = entry["index"]
        if not entry["type"] and not entry["sectors"]:
            lines.append(f"  {index:<2} (unused)")
            continue
        kind = f"0x{entry['type']:02x}"
        if entry["type"] in _PARTITION_TYPES:
            kind += f" {_PARTITION_TYPES[entry['type']]}"
        mark = "  <- decided the geometry" if index == decided else ""
        lines.append(
            f"  {index:<2} {'*' if entry['bootable'] else '':<5}{kind:<22}"
            f"{_chs(entry['start_chs']):<14}{_chs(entry['end_chs']):<14}"
            f"{entry['start_lba']:>12}{entry['sectors']:>12}{mark}"
        )
    return lines


def format_report(report: GeometryReport) -> str:
    """Render the dict :func:`blockemu.explain_geometry` returns as a few aligned lines."""
    geometry = report["geometry"]
    total = report["total_sectors"]
    chs_sectors = report["chs_sectors"]
    trans_origin = {
        "user": "set by the user",
        "auto": "resolved from auto",
        "no-slot": "the device has no translation setting",
    }[report["translation_source"]]

    reach = f"{chs_sectors} sectors reachable by CHS"
    if chs_sectors < total:
        reach += f"; the last {total - chs_sectors} only by LBA"
    elif chs_sectors > total:
        reach += f", {chs_sectors - total} more than the disk has"
    lines = [
        f"device       {report['device']}",
        f"disk         {total} sectors ({_size(total)})",
        f"geometry     {geometry['cyls']} cylinders, {geometry['heads']} heads, "
        f"{geometry['secs']} sectors per track ({reach})",
        f"translation  {geometry['trans']} ({trans_origin})",
        f"reason       {report['reason']}",
    ]

    signature = report["signature"]
    partitions = report["partitions"]
    if signature is None:
        lines.append("sector 0     not available")
    elif not partitions:
        lines.append(f"sector 0     signature {signature}, not an MBR (55aa expected)")
    else:
        lines.append("partition table:")
        lines.extend(_partition_lines(partitions, report["entry"]))
    return "\n".join(lines)
