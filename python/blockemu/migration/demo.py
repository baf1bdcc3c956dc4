"""``blockemu demo``: a live migration between two processes, checked end to end.

The demo creates two raw disk images with an MBR partition table, starts a destination process
and a source process (``python -m blockemu.migration.demo peer CONFIG``), runs a guest workload on
the source that writes through an IDE disk (:class:`~blockemu.drivers.AtaDriver`) and a virtio-blk
disk (:class:`~blockemu.drivers.VirtioBlkDriver`), migrates it live, lets the guest run on the
destination, then reads back every acknowledged write through the destination's drivers. It
checks the invariants while it runs: zero destination reads before activation, at most one holder
of each image's write lock (sampled through /proc/locks from the demo's own process), the whole
image digest equal on both sides, the geometry carried in the stream.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import blockemu
from blockemu._core import GuestMemory, IdeChannel, IdeDisk, VirtioBlk
from blockemu.drivers import AtaDriver, VirtioBlkDriver
from blockemu.guest import GuestWorkload
from blockemu.machine import Machine
from blockemu.migration.common import Timeouts
from blockemu.migration.destination import incoming
from blockemu.migration.source import migrate

__all__ = ["main", "run_demo", "write_mbr"]

DISK_SIZE = 16 << 20
RAM_SIZE = 2 << 20


def write_mbr(path: str | os.PathLike[str], size: int, *, heads: int = 16, secs: int = 63) -> None:
    """Writes an MBR with one Linux partition from sector 2048 to the last whole cylinder, its
    CHS fields consistent with ``heads``/``secs`` (so QEMU's MBR guess finds that geometry)."""

    def chs(lba: int) -> bytes:
        c = min(lba // (heads * secs), 1023)
        h = (lba // secs) % heads
        s = lba % secs + 1
        return bytes([h, s | ((c >> 2) & 0xC0), c & 0xFF])

    total = size // 512
    cyl = heads * secs
    start = 2048
    count = total // cyl * cyl - start  # end on a cylinder boundary, as fdisk's DOS mode did
    entry = (
        b"\x00" + chs(start) + b"\x83" + chs(start + count - 1) + struct.pack("<II", start, count)
    )
    mbr = bytearray(512)
    mbr[440:444] = b"BEMU"  # disk signature
    mbr[446:462] = entry
    mbr[510:512] = b"\x55\xaa"
    with open(path, "r+b") as f:
        f.write(mbr)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------- one peer


def _peer(cfg: dict[str, Any]) -> dict[str, Any]:
    source = cfg["role"] == "source"
    m = Machine()
    ram = GuestMemory(RAM_SIZE)
    m.add("ram", ram)
    ide_node = blockemu.open_image(cfg["ide"], format="raw", active=source)
    ch = IdeChannel(master=IdeDisk(ide_node))
    m.add("ide0", ch)
    vio_node = blockemu.open_image(cfg["virtio"], format="raw", active=source)
    vb = VirtioBlk(vio_node, ram, queue_size=64)
    m.add("vblk0", vb)
    ata = AtaDriver(ch, timeout=10.0)
    vdrv = VirtioBlkDriver(vb, ram, queue_size=64, timeout=10.0)
    wl = GuestWorkload(ata=ata, virtio=vdrv, base=4096, span=256, ack_log=cfg["ack_log"])
    timeouts = Timeouts().scaled(0.2)
    out: dict[str, Any] = {"role": cfg["role"]}
    if source:
        m.start()
        out["probe"] = {"ide": ata.probe(), "virtio_features": vdrv.probe()}
        out["mbr_ide"] = ata.read(0, 1).hex()
        out["mbr_virtio"] = vdrv.read(0, 1).hex()
        m.add_vcpu("cpu0", wl)
        wl.resume()
        time.sleep(float(cfg.get("run_for", 0.5)))
        out["report"] = migrate(m, cfg["uri"], timeout=20.0, timeouts=timeouts, verify="full")
        out["guest_steps_at_stop"] = wl.seq
    else:
        m.add_vcpu("cpu0", wl)

        def ready(uri: str) -> None:
            Path(cfg["ready_file"]).write_text(uri)

        out["report"] = incoming(m, cfg["uri"], timeout=20.0, timeouts=timeouts, ready=ready)
        time.sleep(float(cfg.get("after", 0.3)))
        wl.pause()  # the guest stops writing; the devices keep serving its reads
        if wl.error is not None:
            raise RuntimeError(f"the guest failed on the destination: {wl.error!r}")
        out["checked"] = wl.check()
        out["guest_steps"] = wl.seq
        out["mbr_ide"] = ata.read(0, 1).hex()
        out["mbr_virtio"] = vdrv.read(0, 1).hex()
        m.stop()
    out["nodes"] = {
        name: {"active": n.active, "stats": dict(n.stats())} for name, n in m.iter_nodes()
    }
    return out


# ---------------------------------------------------------------------- the orchestrator


def _holders(path: Path) -> int:
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = set()
    with open("/proc/locks") as f:
        for line in f:
            p = line.split()
            if len(p) >= 8 and p[1] == "OFDLCK" and p[5] == dev:
                end = 1 << 62 if p[7] == "EOF" else int(p[7])
                if int(p[6]) <= 101 <= end:
                    pids.add(p[4])
    return len(pids)


def _spawn(cfg: dict[str, Any], workdir: Path) -> subprocess.Popen[str]:
    path = workdir / f"{cfg['role']}.json"
    path.write_text(json.dumps(cfg))
    return subprocess.Popen(
        [sys.executable, "-m", "blockemu.migration.demo", "peer", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen[str], timeout: float = 60.0) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"peer failed (exit {proc.returncode}): {err[-2000:]}")
    res: dict[str, Any] = json.loads(lines[-1])
    if "error" in res:
        raise RuntimeError(f"{res['role']} failed: {res['error']}")
    return res


def run_demo(directory: str | None = None, transport: str = "tcp") -> dict[str, Any]:
    """Runs the demo; returns its report (``ok`` says whether every check passed)."""
    workdir = Path(directory or tempfile.mkdtemp(prefix="blockemu-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    images = {"ide": workdir / "disk-ide.img", "virtio": workdir / "disk-virtio.img"}
    for p in images.values():
        for stale in (p, Path(str(p) + ".owner")):
            if stale.exists():
                stale.unlink()
        blockemu.create_image(p, DISK_SIZE)
        write_mbr(p, DISK_SIZE)
    ack_log = workdir / "acks.log"
    if ack_log.exists():
        ack_log.unlink()
    if transport == "tcp":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            uri = f"tcp:127.0.0.1:{s.getsockname()[1]}"
    elif transport == "unix":
        uri = f"unix:{workdir / 'migration.sock'}"
    else:
        raise ValueError("transport is 'tcp' or 'unix'")
    ready = workdir / "ready"
    if ready.exists():
        ready.unlink()
    base = {"ide": str(images["ide"]), "virtio": str(images["virtio"]), "uri": uri}
    base["ack_log"] = str(ack_log)
    dst = _spawn({**base, "role": "destination", "ready_file": str(ready)}, workdir)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if dst.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the destination did not start: {dst.communicate()[1][-2000:]}")
        time.sleep(0.01)
    max_holders = {k: 0 for k in images}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for k, p in images.items():
                try:
                    max_holders[k] = max(max_holders[k], _holders(p))
                except OSError:
                    pass
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    src = _spawn({**base, "role": "source"}, workdir)
    try:
        rs = _result(src)
        rd = _result(dst)
    finally:
        stop.set()
        sampler.join()
        for proc in (src, dst):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    srep, drep = rs["report"], rd["report"]
    acked = sum(1 for line in ack_log.read_text().splitlines() if line.strip())
    checks = {
        "destination reads before activation = 0": set(drep["reads_before_activation"].values())
        == {0},
        "destination writes before activation = 0": set(drep["writes_before_activation"].values())
        == {0},
        "one write-lock holder at a time": all(v <= 1 for v in max_holders.values()),
        "every acknowledged write read back on the destination": rd["checked"]["ide"] > 0
        and rd["checked"]["virtio"] > 0,
        "whole-image digests equal": True,  # verify="full": the destination checked them
        "geometry carried in the stream": srep["geometry"] == drep["geometry"]
        and all(g is not None for g in drep["geometry"].values()),
        "partition table intact": rs["mbr_ide"] == rd["mbr_ide"]
        and rs["mbr_virtio"] == rd["mbr_virtio"],
        "source retired (inactive, not running)": not any(
            n["active"] for n in rs["nodes"].values()
        ),
    }
    return {
        "ok": all(checks.values()),
        "dir": str(workdir),
        "transport": transport,
        "uri": uri,
        "phases": [
            {"name": p["name"], "duration_ms": p.get("duration_ms")} for p in srep["phases"]
        ],
        "destination_phases": [
            {"name": p["name"], "duration_ms": p.get("duration_ms")} for p in drep["phases"]
        ],
        "downtime_ms": srep["downtime_ms"],
        "bytes_sent": srep["bytes_sent"],
        "state_bytes": srep["state_bytes"],
        "reads_before_activation": drep["reads_before_activation"],
        "geometry": {"source": srep["geometry"], "destination": drep["geometry"]},
        "guest_steps": {"source": rs["guest_steps_at_stop"], "total": rd["guest_steps"]},
        "acknowledged_writes_logged": acked,
        "read_back": rd["checked"],
        "max_write_lock_holders": max_holders,
        "epoch": srep.get("epoch"),
        "checks": checks,
    }


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"blockemu demo: live migration over {rep['uri']} ({rep['dir']})", "", "phases:"]
    for p in rep["phases"]:
        lines.append(f"  {p['name']:<15} {p['duration_ms']:>9.1f} ms")
    lines += [
        "",
        f"downtime:                 {rep['downtime_ms']:.1f} ms",
        f"bytes sent:               {rep['bytes_sent']} (device state {rep['state_bytes']})",
        f"reads before activation:  {sum(rep['reads_before_activation'].values())}",
        f"geometry carried:         {rep['geometry']['destination']}",
        f"guest steps:              {rep['guest_steps']['source']} on the source,"
        f" {rep['guest_steps']['total']} in all",
        f"read back:                {rep['read_back']} acknowledged sectors",
        "",
    ]
    for name, ok in rep["checks"].items():
        lines.append(f"  [{'ok' if ok else 'FAIL'}] {name}")
    lines.append("")
    lines.append("PASS" if rep["ok"] else "FAIL")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "peer":
        cfg = json.loads(Path(args[1]).read_text())
        try:
            res = _peer(cfg)
        except Exception as e:
            res = {"role": cfg.get("role"), "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(res), flush=True)
        return 0
    print("usage: python -m blockemu.migration.demo peer CONFIG.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
