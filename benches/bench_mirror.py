"""Mirror migration (issue 8): copy throughput and downtime, each against its baseline in the
same run.

1. Throughput. An idle 1 GiB raw image (every byte data: no hole to skip) in /dev/shm is copied
   over loopback TCP to an NBD export of an empty image served by another process:
   - baseline: ``qemu-img convert -n -O raw SRC nbd://127.0.0.1:PORT/`` into ``qemu-nbd``;
   - ours: a :class:`blockemu.MirrorJob` from the source node to our NBD client, into a
     :class:`blockemu.NbdServer` in another process (target >= 0.8x the baseline's rate).
2. Downtime. A guest writes 20 MiB/s of 64 KiB blocks through virtio-blk while its 256 MiB disk
   is mirrored; ``migrate(storage="mirror")`` between two processes; the median of the reported
   downtimes (stop of the guest → the destination's commit), target <= 50 ms.

Run: python benches/bench_mirror.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import blockemu
from _results import Results
from blockemu.drivers import VirtioBlkDriver
from blockemu.guest import GuestWorkload
from blockemu.machine import Machine
from blockemu.migration import Timeouts, incoming, migrate

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fill(path: Path, size: int) -> None:
    block = os.urandom(4 * MiB)
    with open(path, "wb") as f:
        for off in range(0, size, len(block)):
            f.write(block[: min(len(block), size - off)])


# ---------------------------------------------------------------------- throughput


def _serve(path: str, conn: Any) -> None:
    """Another process: our NBD server exporting ``path`` until told to stop."""
    node = blockemu.open_image(path, format="raw")
    server = blockemu.NbdServer("tcp:127.0.0.1:0")
    uri = server.add_export("bench", node)
    conn.send(uri)
    conn.recv()
    server.close()
    node.flush()
    node.close()
    conn.send("closed")


def ours(src: Path, dst: Path, size: int) -> float:
    blockemu.create_image(dst, size)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(str(dst), child))
    proc.start()
    try:
        uri = parent.recv()
        node = blockemu.open_image(src, format="raw")
        target = blockemu.open_image(uri, format="raw")
        t0 = time.perf_counter()
        job = blockemu.MirrorJob(node, target, target_zeroed=False)
        job.wait_ready(600)
        job.complete(600)
        elapsed = time.perf_counter() - t0
        target.close()
        node.close()
        parent.send("stop")
        parent.recv()
    finally:
        proc.join(30)
    return elapsed


def baseline(src: Path, dst: Path, size: int) -> float:
    blockemu.create_image(dst, size)
    port = free_port()
    server = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-t", str(dst)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        end = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > end:
                    raise RuntimeError("qemu-nbd did not start") from None
                time.sleep(0.02)
        t0 = time.perf_counter()
        target = f"nbd://127.0.0.1:{port}/"
        subprocess.run(
            ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), target],
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(10)


def same(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 * MiB), fb.read(8 * MiB)
            if x != y:
                return False
            if not x:
                return True


# ---------------------------------------------------------------------- downtime

RAM = 4 * MiB


def _machine(path: str, active: bool) -> tuple[Machine, GuestWorkload]:
    m = Machine()
    ram = blockemu.GuestMemory(RAM)
    m.add("ram", ram)
    node = blockemu.open_image(path, format="raw", active=active)
    vb = blockemu.VirtioBlk(node, ram, queue_size=64)
    m.add("vblk0", vb)
    drv = VirtioBlkDriver(vb, ram, queue_size=64, timeout=10.0)
    size = 256 * MiB
    wl = GuestWorkload(
        virtio=drv, base=2048, span=size // 512 - 2048, stride=128, scatter=True, rate=20 * MiB
    )
    return m, wl


def _destination(path: str, uri: str, conn: Any) -> None:
    m, wl = _machine(path, active=False)
    m.add_vcpu("cpu0", wl)
    rep = incoming(m, uri, timeout=60, ready=lambda _: conn.send("ready"), storage="mirror")
    wl.pause()
    m.stop()
    conn.send(rep.get("activation_ms"))


def one_downtime(tmp: Path, run_for: float) -> dict[str, Any]:
    src, dst = tmp / "dt-src.img", tmp / "dt-dst.img"
    size = 256 * MiB
    blockemu.create_image(src, size)
    with open(src, "r+b") as f:
        f.write(os.urandom(64 * MiB))
    blockemu.create_image(dst, size)
    uri = f"unix:{tmp / 'mig.sock'}"
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_destination, args=(str(dst), uri, child))
    proc.start()
    try:
        assert parent.recv() == "ready"
        m, wl = _machine(str(src), active=True)
        m.start()
        assert wl.virtio is not None
        wl.virtio.probe()  # the guest driver sets the device up, then the workload runs
        m.add_vcpu("cpu0", wl)
        wl.resume()
        time.sleep(run_for)
        t0 = time.monotonic()
        rep = migrate(m, uri, timeout=60, timeouts=Timeouts(mirror=600), storage="mirror")
        rep["wall_s"] = time.monotonic() - t0
        if wl.error is not None:
            raise RuntimeError(f"the guest failed: {wl.error!r}")
        rep["guest_bytes_per_s"] = wl.seq * 128 * 512 / (run_for + rep["wall_s"])
        parent.recv()
        for _, node in m.iter_nodes():
            node.close()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return rep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small smoke run (figures only)")
    ap.add_argument("--json", action="store_true", help="one JSON line per result on stdout")
    args = ap.parse_args()
    out = Results("mirror", args.json)
    results = []
    shm = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
    tmp = Path(tempfile.mkdtemp(prefix="bench-mirror-", dir=shm))
    try:
        size = 64 * MiB if args.quick else 1024 * MiB
        src = tmp / "src.img"
        fill(src, size)
        repeats = 1 if args.quick else 3
        have_qemu = shutil.which("qemu-nbd") and shutil.which("qemu-img")
        t_ours, t_base = float("inf"), float("inf")
        for _ in range(repeats):
            if have_qemu:
                t_base = min(t_base, baseline(src, tmp / "dst.img", size))
            t_ours = min(t_ours, ours(src, tmp / "dst.img", size))
            assert same(src, tmp / "dst.img"), "the mirror's copy differs from the source"
        rate = size / t_ours / MiB
        if have_qemu:
            base_rate = size / t_base / MiB
            results.append(
                {
                    "bench": f"mirror {size // MiB} MiB idle image over loopback TCP (MiB/s)",
                    "ours": round(rate, 1),
                    "baseline": "qemu-img convert -n to qemu-nbd",
                    "baseline_value": round(base_rate, 1),
                    "ratio": round(rate / base_rate, 3),
                    "target": ">= 0.8",
                }
            )
        else:
            results.append({"bench": "mirror throughput (MiB/s)", "ours": round(rate, 1)})
        os.unlink(src)
        runs = 1 if args.quick else 7
        downs = []
        for i in range(runs):
            rep = one_downtime(tmp, 0.5 if args.quick else 1.5)
            downs.append(rep["downtime_ms"])
            if i == 0:
                guest_rate = rep["guest_bytes_per_s"] / MiB
        results.append(
            {
                "bench": "mirror migration downtime, guest writing 20 MiB/s (ms, median)",
                "ours": round(statistics.median(downs), 1),
                "runs": [round(d, 1) for d in downs],
                "guest_MiB_per_s": round(guest_rate, 1),
                "target": "<= 50",
            }
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in results:
        extra = ""
        if "ratio" in r:
            extra = f" vs {r['baseline']} {r['baseline_value']} -> {r['ratio']}x"
        if "runs" in r:
            extra = f" (runs {r['runs']}, guest wrote {r['guest_MiB_per_s']} MiB/s)"
        print(f"{r['bench']}: {r['ours']}{extra} (target {r.get('target', '-')})")
        name = r["bench"].rsplit(" (", 1)[0]
        if "runs" in r:
            name += f" (median of {len(r['runs'])}; the guest wrote {r['guest_MiB_per_s']} MiB/s)"
        out.add(
            name,
            r["ours"],
            "ms" if "downtime" in r["bench"] else "MiB/s",
            baseline=r.get("baseline"),
            baseline_value=r.get("baseline_value"),
            ratio=r.get("ratio"),
            target=r.get("target"),
        )
    out.emit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
