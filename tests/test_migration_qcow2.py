"""Live migration of qcow2 images between two processes (specs/migration.md §13 scenario 16, the
dirty-bit ping-pong), with a guest writing through IDE and virtio-blk.

The images use lazy refcounts, so a writer sets the header's dirty bit (incompatible feature bit
0: byte 79) and clears it on a clean inactivate/close. The source's writes set it; after the
handover (at SOURCE_INACTIVE) the source has cleared it; the destination's writes set it again;
the retired source's close writes nothing (the header bytes stay as the destination left them);
after the destination closes, ``qemu-img check`` is clean and every acknowledged write is there.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

import blockemu
from blockemu import _core
from blockemu.migration import read_record
from migration_harness import (
    FAST,
    check_acked_on_images,
    read_ack_log,
    start_peer,
    uri_pair,
    wait_file,
)

from peers import require_tool

pytestmark = pytest.mark.skipif(
    not hasattr(_core, "save_state"), reason="device-state encoding not in this build"
)

SIZE = 2 << 20
DIRTY_BYTE = 79  # the last byte of the big-endian incompatible_features (offset 72), bit 0


def dirty(header_hex: str) -> int:
    return bytes.fromhex(header_hex)[DIRTY_BYTE] & 1


def test_qcow2_two_process_migration(tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    images = {k: tmp_path / f"{k}.qcow2" for k in ("ide", "virtio")}
    for p in images.values():
        blockemu.create_image(p, SIZE, format="qcow2", lazy_refcounts=True)
        assert blockemu.image_info(p)["dirty"] is False
    files = [str(p) for p in images.values()]
    ack_log = tmp_path / "acks.log"
    base: dict[str, Any] = {
        "ide": str(images["ide"]),
        "virtio": str(images["virtio"]),
        "format": "qcow2",
        "timeouts": FAST,
        "timeout": 10.0,
        "workload": {"inflight": False, "run_for": 0.3, "ack_log": str(ack_log)},
    }
    uri = uri_pair(tmp_path, "unix")
    ready = tmp_path / "ready"
    d = start_peer(
        {
            **base,
            "role": "destination",
            "uri": uri,
            "ready_file": str(ready),
            # hold the activation back a moment: the source's peek at "handed_off" then sees
            # the header exactly as the source's inactivation left it
            "delay_at": {"activating": 0.3},
            "after": 1.2,
            # the destination's guest writes 1 MiB further on: clusters the source never
            # allocated, so the destination's allocations set the dirty bit again
            "workload": {**base["workload"], "base": 2048},
            "peek": {"end": files},
        },
        tmp_path,
    )
    wait_file(ready)
    s = start_peer(
        {
            **base,
            "role": "source",
            "uri": uri,
            "peek": {"connecting": files, "handed_off": files},
            "close_peek": files,
            "before_close": 0.4,
        },
        tmp_path,
    )
    rs, rd = s.result(), d.result()
    for r in (rs, rd):
        assert "crash" not in r, r["crash"]
    assert rs["ok"], rs
    assert rd["ok"], rd
    assert rs["state_after"] == "postmigrate"
    rep = rd["report"]
    assert set(rep["reads_before_activation"].values()) == {0}
    assert set(rep["writes_before_activation"].values()) == {0}
    for f in files:
        # the source's guest wrote: dirty while the source owned the image
        assert dirty(rs["peeks"]["connecting"][f]) == 1, f
        # SOURCE_INACTIVE: the source's inactivation flushed and cleared the bit
        assert dirty(rs["peeks"]["handed_off"][f]) == 0, f
        # the destination's guest wrote: dirty again, the destination's
        assert dirty(rd["peeks"]["end"][f]) == 1, f
        # the retired (inactive) source's close wrote nothing: the header is as the
        # destination left it, dirty bit included
        before, after = rs["close_peeks"]["before"][f], rs["close_peeks"]["after"][f]
        assert before == after, f
        assert dirty(after) == 1, f
    for name, info in rs["nodes"].items():
        assert not info["active"], name
    assert rd["check"]["ide"] > 0 and rd["check"]["virtio"] > 0
    assert "guest_error" not in rd, rd["guest_error"]

    # both processes are gone: the destination's close left clean images
    for p in images.values():
        assert p.read_bytes()[DIRTY_BYTE] & 1 == 0, p
        rec = read_record(p)
        assert rec is not None and rec.role == "destination" and rec.epoch == rep["epoch"]
        chk = subprocess.run(
            [qemu_img, "check", "--output=json", "-f", "qcow2", str(p)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert chk.returncode == 0, chk.stdout + chk.stderr
        res = json.loads(chk.stdout)
        assert not res.get("corruptions") and not res.get("leaks"), res
        fix = subprocess.run(
            [qemu_img, "check", "-r", "all", "-f", "qcow2", str(p)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert fix.returncode == 0, fix.stdout + fix.stderr
        assert "No errors were found on the image." in fix.stdout, fix.stdout
        assert "Repairing" not in fix.stdout + fix.stderr, fix.stdout

    # every acknowledged write is there: the guest's view, as raw
    raws = {}
    for k, p in images.items():
        raw = tmp_path / f"{k}.raw"
        subprocess.run(
            [qemu_img, "convert", "-f", "qcow2", "-O", "raw", str(p), str(raw)],
            check=True,
            timeout=30,
        )
        raws[k] = raw
    acked = read_ack_log(ack_log)
    assert sum(len(v) for v in acked.values()) > 0
    check_acked_on_images(acked, raws)
