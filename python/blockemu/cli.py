"""The ``blockemu`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import blockemu
from blockemu.errors import BlockemuError
from blockemu.geometry import format_report


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _cmd_info(args: argparse.Namespace) -> int:
    info: dict[str, Any] = dict(blockemu.image_info(args.image))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"image: {info['path']}")
    print(f"file format: {info['format']}")
    print(f"virtual size: {_human(info['virtual_size'])} ({info['virtual_size']} bytes)")
    print(f"disk size: {_human(info['allocated_size'])}")
    if info["format"] == "qcow2":
        print(f"dirty: {'yes' if info['dirty'] else 'no'}")
    print(f"lock: {info['lock']}")
    if "read_only" in info:
        print(f"read-only: {'yes' if info['read_only'] else 'no'}")
    if info["locks_held"] or info["locks_unshared"]:
        held = ", ".join(info["locks_held"]) or "-"
        unshared = ", ".join(info["locks_unshared"]) or "-"
        print(f"  others hold: {held}; others refuse to share: {unshared}")
    return 0


def _parse_size(text: str) -> int:
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b") if text else text
    num = t.rstrip("kmgt")
    suffix = t[len(num) :]
    if not num or suffix not in units:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 512, 64K, 10M, 2G)")
    try:
        value = int(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("size must be >= 0")
    return value * units[suffix]


def _cmd_create(args: argparse.Namespace) -> int:
    blockemu.create_image(args.image, args.size, format=args.format)
    print(f"Formatting '{args.image}', fmt={args.format} size={args.size}")
    return 0


def _cmd_geometry(args: argparse.Namespace) -> int:
    with blockemu.open_image(args.image, readonly=True, force_share=args.force_share) as node:
        size = node.size or 0
        boot = node.read(0, min(512, size)) if size else None
    report = blockemu.explain_geometry(
        boot,
        -(-size // 512),  # a partial last sector counts, as in QEMU
        cyls=args.cyls,
        heads=args.heads,
        secs=args.secs,
        trans=args.trans,
        device=args.device,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"image: {args.image}")
        print(format_report(report))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from blockemu.migration.demo import format_report, run_demo

    report = run_demo(
        args.dir,
        args.transport,
        args.storage,
        disk_size=args.disk_size,
        speed=args.speed,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0 if report["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockemu",
        description="Emulate a virtual machine's block layer: images, geometry, devices.",
    )
    parser.add_argument("--version", action="version", version=f"blockemu {blockemu.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="show an image's format, sizes and lock state")
    p.add_argument("image", help="a path, nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "geometry",
        help="show the partition table and the CHS geometry a device would report",
        description="Show the partition table of IMAGE's sector 0 and the geometry (and BIOS "
        "translation) QEMU's ide-hd or virtio-blk would give it, with the reason.",
    )
    p.add_argument("image")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--device", default="ide", choices=["ide", "virtio", "scsi-hd"])
    p.add_argument("--cyls", type=int, default=0, help="user geometry: cylinders")
    p.add_argument("--heads", type=int, default=0, help="user geometry: heads")
    p.add_argument("--secs", type=int, default=0, help="user geometry: sectors per track")
    p.add_argument("--trans", default="auto", choices=["auto", "none", "lba", "large", "rechs"])
    p.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="open without locking (an image another process is writing)",
    )
    p.set_defaults(func=_cmd_geometry)

    p = sub.add_parser("create", help="create an image (like qemu-img create)")
    p.add_argument("image")
    p.add_argument("size", type=_parse_size, help="size in bytes, or with K/M/G/T suffix")
    p.add_argument("-f", "--format", default="raw", choices=["raw", "qcow2"])
    p.set_defaults(func=_cmd_create)

    p = sub.add_parser(
        "demo",
        help="live-migrate a guest between two processes and check every invariant",
        description="Create disk images with a partition table, start a source and a destination "
        "process, run a guest workload through an IDE and a virtio-blk disk, migrate it live, "
        "then verify every acknowledged write and the migration invariants.",
    )
    p.add_argument("--dir", default=None, help="working directory (default: a new temporary one)")
    p.add_argument("--transport", default="tcp", choices=["tcp", "unix"])
    p.add_argument(
        "--storage",
        default="shared",
        choices=["shared", "mirror"],
        help="shared: both processes use the same image files; mirror: the destination has its "
        "own empty images and the disks are copied while the guest runs (with a progress bar)",
    )
    p.add_argument(
        "--disk-size",
        type=_parse_size,
        default=None,
        help="size of each disk (default 16M, or 256M with --storage mirror)",
    )
    p.add_argument(
        "--speed",
        type=_parse_size,
        default=0,
        help="--storage mirror: cap the copy at this many bytes/s (K/M/G suffixes; 0: no cap)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (BlockemuError, OSError, ValueError) as e:
        print(f"blockemu {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
