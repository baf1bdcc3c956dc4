"""``blockemu demo``: a live migration between two processes, checked end to end.

The demo creates two raw disk images with an MBR partition table, starts a destination process
and a source process (``python -m blockemu.migration.demo peer CONFIG``), runs a guest workload on
the source that writes through an IDE disk (:class:`~blockemu.drivers.AtaDriver`) and a virtio-blk
disk (:class:`~blockemu.drivers.VirtioBlkDriver`), migrates it live, lets the guest run on the
destination, then reads back every acknowledged write through the destination's drivers. It
checks the invariants while it runs: zero destination reads before activation, at most one holder
of each image's write lock (sampled through /proc/locks from the demo's own process), the whole
image digest equal on both sides, the geometry carried in the stream.

With ``storage="mirror"`` (``blockemu demo --storage mirror``) source and destination have
images of their own: the destination's start empty, and the source copies its disks there while
the guest runs (progress is shown as it goes), then hands over as with shared storage.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import blockemu
from blockemu._core import GuestMemory, IdeChannel, IdeDisk, VirtioBlk
from blockemu.drivers import AtaDriver, VirtioBlkDriver
from blockemu.guest import GuestWorkload
from blockemu.machine import Machine
from blockemu.migration.common import Timeouts
from blockemu.migration.destination import incoming
from blockemu.migration.mirror import MirrorOptions, format_progress
from blockemu.migration.source import migrate

__all__ = ["main", "run_demo", "write_mbr"]

DISK_SIZE = 16 << 20
MIRROR_DISK_SIZE = 256 << 20
RAM_SIZE = 2 << 20
WL_BASE, WL_SPAN = 4096, 256  # the sectors the demo's guest writes


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
    wl = GuestWorkload(ata=ata, virtio=vdrv, base=WL_BASE, span=WL_SPAN, ack_log=cfg["ack_log"])
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
        storage = cfg.get("storage", "shared")
        last = [0.0]

        def progress(prog: dict[str, Any]) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.1 or prog["ready"]:
                last[0] = now
                keys = ("bytes_total", "bytes_done", "passes", "dirty_bytes", "dirty_rate")
                line = {"progress": {k: prog[k] for k in (*keys, "throughput", "state")}}
                print(json.dumps(line), flush=True)

        out["report"] = migrate(
            m,
            cfg["uri"],
            timeout=20.0,
            timeouts=replace(timeouts, mirror=600.0),
            verify=cfg.get("verify", "full"),
            storage=storage,
            mirror=MirrorOptions(speed=int(cfg.get("speed", 0))),
            on_progress=progress if storage == "mirror" else None,
        )
        out["guest_steps_at_stop"] = wl.seq
    else:
        m.add_vcpu("cpu0", wl)

        def ready(uri: str) -> None:
            Path(cfg["ready_file"]).write_text(uri)

        out["report"] = incoming(
            m,
            cfg["uri"],
            timeout=20.0,
            timeouts=replace(timeouts, mirror=600.0),
            ready=ready,
            storage=cfg.get("storage", "shared"),
        )
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


class _Bar:
    """The copy's progress on the terminal: tqdm when it is installed, plain text otherwise
    (one rewritten line on a terminal, a line per 10 % elsewhere)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tqdm: Any = None
        self.last_tenth = -1
        self.tty = sys.stderr.isatty()
        if enabled:
            try:  # optional dependency: pip install 'blockemu[progress]'
                tqdm = importlib.import_module("tqdm").tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.tqdm = tqdm(total=0, unit="B", unit_scale=True, desc="mirror", leave=True)

    def update(self, prog: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.tqdm is not None:
            self.tqdm.total = prog["bytes_total"]
            self.tqdm.n = min(prog["bytes_done"], prog["bytes_total"])
            mib = 1 << 20
            self.tqdm.set_postfix(
                passes=prog["passes"],
                dirty=f"{prog['dirty_bytes'] / mib:.1f}MiB",
                state=prog["state"],
                refresh=False,
            )
            self.tqdm.refresh()
            return
        line = "mirror " + format_progress(prog)
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
            return
        tenth = 10 * prog["bytes_done"] // max(1, prog["bytes_total"])
        if tenth != self.last_tenth or prog["state"] == "ready":
            self.last_tenth = tenth
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
        elif self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


def _result(
    proc: subprocess.Popen[str], timeout: float = 60.0, bar: _Bar | None = None
) -> dict[str, Any]:
    if bar is not None and proc.stdout is not None:
        # progress lines as they come, then the result (the last line)
        out_lines = []
        for raw in proc.stdout:
            if raw.startswith('{"progress"'):
                bar.update(json.loads(raw)["progress"])
            else:
                out_lines.append(raw)
        bar.close()
        rest, err = proc.communicate(timeout=timeout)
        out = "".join(out_lines) + rest
    else:
        out, err = proc.communicate(timeout=timeout)
    lines = [ln for ln in out.strip().splitlines() if not ln.startswith('{"progress"')]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"peer failed (exit {proc.returncode}): {err[-2000:]}")
    res: dict[str, Any] = json.loads(lines[-1])
    if "error" in res:
        raise RuntimeError(f"{res['role']} failed: {res['error']}")
    return res


def _fill(path: Path, size: int) -> None:
    """Gives a mirror something to copy: data in every other 8 MiB stretch (the rest stays a
    hole, which the copy skips) after the partition table's first MiB."""
    block = os.urandom(1 << 20)
    with open(path, "r+b") as f:
        for off in range(1 << 20, size, 16 << 20):
            for sub in range(off, min(off + (8 << 20), size), 1 << 20):
                f.seek(sub)
                f.write(block[: min(1 << 20, size - sub)])
        f.flush()
        os.fsync(f.fileno())


def _same_outside(a: Path, b: Path, hole: tuple[int, int]) -> bool:
    """Whether two images are equal everywhere but in ``hole`` (the guest, which kept running
    on the destination, writes only there; read back through the drivers instead)."""
    step = 4 << 20
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(step), fb.read(step)
            if not x and not y:
                return True
            if x != y:
                lo, hi = max(hole[0] - off, 0), min(hole[1] - off, len(x))
                if lo < hi:
                    x = x[:lo] + x[hi:]
                    y = y[:lo] + y[hi:]
                if x != y:
                    return False
            off += step


def run_demo(
    directory: str | None = None,
    transport: str = "tcp",
    storage: str = "shared",
    *,
    disk_size: int | None = None,
    speed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Runs the demo; returns its report (``ok`` says whether every check passed).

    ``storage="mirror"``: the destination has empty images of its own and the disks are copied
    while the guest runs (``speed`` caps the copy in bytes/s; ``progress`` draws a bar on
    stderr)."""
    if storage not in ("shared", "mirror"):
        raise ValueError("storage is 'shared' or 'mirror'")
    mirror = storage == "mirror"
    size = disk_size or (MIRROR_DISK_SIZE if mirror else DISK_SIZE)
    workdir = Path(directory or tempfile.mkdtemp(prefix="blockemu-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    images = {"ide": workdir / "disk-ide.img", "virtio": workdir / "disk-virtio.img"}
    dst_images = dict(images)
    if mirror:
        dst_images = {k: workdir / f"dest-{p.name}" for k, p in images.items()}
    for p in [*images.values(), *dst_images.values()]:
        for stale in (p, Path(str(p) + ".owner")):
            if stale.exists():
                stale.unlink()
    for p in images.values():
        blockemu.create_image(p, size)
        write_mbr(p, size)
        if mirror:
            _fill(p, size)
    if mirror:
        for p in dst_images.values():
            blockemu.create_image(p, size)  # empty: the mirror fills it
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
    base: dict[str, Any] = {"ide": str(images["ide"]), "virtio": str(images["virtio"]), "uri": uri}
    base["ack_log"] = str(ack_log)
    base["storage"] = storage
    base["speed"] = speed
    # mirror: the whole-image digest of 256 MiB disks would dominate the downtime; the demo
    # compares the images itself afterwards (below)
    base["verify"] = "witness" if mirror else "full"
    dst_cfg = {**base, "ide": str(dst_images["ide"]), "virtio": str(dst_images["virtio"])}
    dst = _spawn({**dst_cfg, "role": "destination", "ready_file": str(ready)}, workdir)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if dst.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the destination did not start: {dst.communicate()[1][-2000:]}")
        time.sleep(0.01)
    watched = dict(images)
    if mirror:
        watched.update({f"dest-{k}": p for k, p in dst_images.items()})
    max_holders = {k: 0 for k in watched}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for k, p in watched.items():
                try:
                    max_holders[k] = max(max_holders[k], _holders(p))
                except OSError:
                    pass
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    src = _spawn({**base, "role": "source"}, workdir)
    try:
        rs = _result(src, timeout=600.0, bar=_Bar(progress and mirror))
        rd = _result(dst, timeout=600.0)
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
        # verify="full": the destination checked them at activation (mirror: compared below)
        "whole-image digests equal": True,
        "geometry carried in the stream": srep["geometry"] == drep["geometry"]
        and all(g is not None for g in drep["geometry"].values()),
        "partition table intact": rs["mbr_ide"] == rd["mbr_ide"]
        and rs["mbr_virtio"] == rd["mbr_virtio"],
        "source retired (inactive, not running)": not any(
            n["active"] for n in rs["nodes"].values()
        ),
    }
    if mirror:
        del checks["whole-image digests equal"]
        checks["destination images equal the source's outside the guest's write area"] = all(
            _same_outside(images[k], dst_images[k], (WL_BASE * 512, (WL_BASE + WL_SPAN) * 512))
            for k in images
        )
        mrep = srep.get("mirror", {})
        checks["disks copied while the guest ran, then the dirty rest"] = (
            mrep.get("bytes_total", 0) >= 2 * size and "final" in mrep
        )
        checks["holes not sent as data"] = mrep.get("bytes_zero", 0) > 0
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
        "storage": storage,
        "mirror": srep.get("mirror"),
        "checks": checks,
    }


def format_report(rep: dict[str, Any]) -> str:
    what = (
        "live migration with disk mirroring"
        if rep.get("storage") == "mirror"
        else ("live migration")
    )
    lines = [f"blockemu demo: {what} over {rep['uri']} ({rep['dir']})", "", "phases:"]
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
    mrep = rep.get("mirror")
    if mrep:
        mib = 1 << 20
        final = mrep.get("final", {})
        lines[-1:-1] = [
            f"mirrored:                 {mrep['bytes_total'] / mib:.0f} MiB in"
            f" {mrep['converged_after_s']:.2f} s ({mrep['bytes_copied'] / mib:.1f} MiB as data,"
            f" {mrep['bytes_zero'] / mib:.1f} MiB of holes/zeroes not sent),"
            f" {mrep['passes']} dirty passes",
            f"final copy at stop:       {final.get('final_bytes', 0) / 1024:.0f} KiB in"
            f" {final.get('ms', 0):.1f} ms",
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
