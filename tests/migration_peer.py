"""One side of a migration test, in its own process.

``python tests/migration_peer.py CONFIG.json`` builds a machine from the JSON config (an IDE disk
and a virtio-blk disk over raw images, guest RAM, a guest workload as its vCPU), runs the source
(:func:`blockemu.migration.migrate`) or the destination (:func:`blockemu.migration.incoming`), and
prints one JSON object on stdout: the report or the error, the machine's run state, every node's
activity/stats/locks, and the read-back check of the acknowledged writes.

Config keys: ``role`` ("source"/"destination"), ``uri``, ``ide``/``virtio`` (image paths or null),
``ide2`` (an image on a second IDE channel, ``ide1``, that no guest driver uses), ``ide_geometry``
([c, h, s] user geometry of the IDE disk), ``ram``, ``timeout``, ``timeouts`` (overrides),
``workload`` (null or {"inflight", "run_for", "ack_log", "base", "span"}), ``fault``
({"device", "op", "n", "count", "arm_at"}: a FaultInjector rule, or op "stall", or op
"stall_read" (device "ide2": stall, then a READ SECTORS on ``ide1``), armed when the coordinator
enters phase ``arm_at``),
``release_after`` (release stalls after the migration), ``cancel_at`` (a phase), ``delay_at``
({phase: seconds}: sleep on entering it), ``exec_at`` ({phase: argv}: run a command on entering
it), ``autostart``, ``after`` (seconds the guest runs after the migration), ``hold`` (seconds to
stay alive at the end, locks held), ``open_error`` (the destination cannot open its image),
``ready_file`` (the destination writes it once listening), ``verify``, ``then_migrate``
({"uri", "timeout"}: a destination migrates its machine on once it has it).
The hazard scenarios (tests/test_hazard.py): ``host_cache`` (every node models one NFS client of
the shared image), ``cor_cache`` (a directory: each node gets a copy-on-read cache file there),
``revalidate`` (false: caches survive activation, the pre-2010 hazard), ``geometry_policy``
("lazy"/"eager" for every disk), ``mbr`` (hex of a sector 0 the source host writes to the IDE
image before it builds its machine: a repartition); the output then has ``ide_geometry`` (the
IDE disk's geometry in the end), ``ide_sector0`` (sector 0 as the guest reads it after the
migration) and ``cached_blocks`` per node.
Shared storage other than raw files: ``ide``/``virtio`` may be NBD URIs (``nbd+unix:///…``),
``format`` ("raw" or "qcow2", for every disk), ``records`` ({node name: ownership record path},
passed as ``records=``). ``peek`` ({phase: [file, …]}, or the phase "end": the source after
its migration returned, the destination after its guest stopped) records the first 512 bytes of
each file (hex) in ``peeks``; ``close_peek`` (files; the source) closes the machine's nodes after
the migration and records the same bytes before and after the close in ``close_peeks``.
``stats_at`` ([phase, …]) records every node's full stats on entering those phases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import blockemu
import migration_fakestate
from blockemu import (
    FaultInjector,
    GuestMemory,
    IdeChannel,
    IdeDisk,
    Machine,
    MigrationError,
    VirtioBlk,
)
from blockemu.drivers import AtaDriver, VirtioBlkDriver
from blockemu.guest import GuestWorkload
from blockemu.migration import Timeouts, incoming, migrate
from blockemu.migration.mirror import MirrorOptions

# the last machine built here: its IDE disk and ATA driver (for _hazard_view)
_VIEW: dict[str, Any] = {}


def _node_info(m: Machine) -> dict[str, Any]:
    out = {}
    for name, node in m.iter_nodes():
        out[name] = {
            "active": node.active,
            "stats": node.stats(),
            "locks": node.locks(),
            "cached_blocks": node.cached_blocks(),
        }
    return out


def _open(cfg: dict[str, Any], key: str, *, source: bool, fi: FaultInjector) -> blockemu.BlockNode:
    cor = cfg.get("cor_cache")
    return blockemu.open_image(
        cfg[key],
        format=cfg.get("format", "raw"),
        active=source,
        faults=fi,
        host_cache=bool(cfg.get("host_cache", False)),
        cor_cache=str(Path(cor) / f"{key}-{'src' if source else 'dst'}.cache") if cor else None,
        revalidate=bool(cfg.get("revalidate", True)),
    )


def build(cfg: dict[str, Any], *, source: bool) -> tuple[Machine, GuestWorkload | None, dict]:
    m = Machine()
    ram = GuestMemory(int(cfg.get("ram", 4 << 20)))
    m.add("ram", ram)
    faults: dict[str, FaultInjector] = {}
    ata = vdrv = None
    if cfg.get("ide"):
        fi = faults["ide"] = FaultInjector()
        node = _open(cfg, "ide", source=source, fi=fi)
        c, h, s = cfg.get("ide_geometry") or (0, 0, 0)
        policy = cfg.get("geometry_policy", "lazy")
        disk = IdeDisk(node, cyls=c, heads=h, secs=s, geometry_policy=policy)
        ch = IdeChannel(master=disk)
        _VIEW["ide_disk"] = disk
        m.add("ide0", ch)
        ata = AtaDriver(ch, timeout=5.0)
    if cfg.get("ide2"):
        # a second channel no guest driver uses: tests issue raw commands on it
        fi = faults["ide2"] = FaultInjector()
        node = blockemu.open_image(cfg["ide2"], format="raw", active=source, faults=fi)
        m.add("ide1", IdeChannel(master=IdeDisk(node, cyls=20, heads=16, secs=63)))
    if cfg.get("virtio"):
        fi = faults["virtio"] = FaultInjector()
        node = _open(cfg, "virtio", source=source, fi=fi)
        vb = VirtioBlk(node, ram, queue_size=64, geometry_policy=cfg.get("geometry_policy", "lazy"))
        m.add("vblk0", vb)
        vdrv = VirtioBlkDriver(vb, ram, queue_size=64, timeout=5.0)
    wl = None
    w = cfg.get("workload")
    if w is not None:
        wl = GuestWorkload(
            ata=ata,
            virtio=vdrv,
            inflight=bool(w.get("inflight", False)),
            ack_log=w.get("ack_log"),
            base=int(w.get("base", 64)),
            span=int(w.get("span", 128)),
            stride=int(w.get("stride", 1)),
            scatter=bool(w.get("scatter", False)),
            rate=w.get("rate"),
            step_delay=float(w.get("step_delay", 0.0005)),
        )
    _VIEW["ata"] = ata
    return m, wl, faults


def _hazard_view(m: Machine, out: dict[str, Any]) -> None:
    """What the guest sees in the end: the IDE disk's geometry and sector 0."""
    disk = _VIEW.get("ide_disk")
    if disk is None:
        return
    g = disk.geometry
    out["ide_geometry"] = None if g is None else [g.cyls, g.heads, g.secs]
    ata = _VIEW.get("ata")
    if m.running and ata is not None:
        out["ide_sector0"] = ata.read(0, 1).hex()


def _error_info(e: MigrationError) -> dict[str, Any]:
    return {
        "message": str(e),
        "phase": e.phase,
        "source_resumed": e.source_resumed,
        "cause": repr(e.__cause__),
        "cause_type": type(e.__cause__).__name__,
    }


def _peek(paths: list[str]) -> dict[str, str]:
    out = {}
    for p in paths:
        with open(p, "rb") as f:
            out[p] = f.read(512).hex()
    return out


def main() -> int:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    fake = migration_fakestate.install_if_missing()
    role = cfg["role"]
    out: dict[str, Any] = {"role": role, "fake_state": fake, "phases_seen": [], "phase_times": []}
    timeouts = Timeouts(**cfg.get("timeouts", {}))
    cancel = threading.Event()
    holder: dict[str, Any] = {}

    records = cfg.get("records")
    peek = cfg.get("peek", {})
    out["peeks"] = {}

    stats_at = cfg.get("stats_at", [])
    out["stats_at"] = {}

    def on_phase(name: str) -> None:
        if name in peek:
            out["peeks"][name] = _peek(peek[name])
        if name in stats_at and "m" in holder:
            out["stats_at"][name] = {n: nd.stats() for n, nd in holder["m"].iter_nodes()}
        out["phases_seen"].append(name)
        out["phase_times"].append([name, time.monotonic()])
        fault = cfg.get("fault")
        if fault and fault.get("arm_at") == name:
            fi = holder["faults"][fault["device"]]
            if fault["op"] == "stall":
                fi.stall()
            elif fault["op"] == "stall_read":
                # the guest's last instruction before the stop: READ SECTORS on the second
                # IDE channel, whose storage stalls; the command stays in flight
                fi.stall()
                ch = holder["m"].devices["ide1"]
                for reg, val in ((2, 1), (3, 7), (4, 0), (5, 0), (6, 0xE0), (7, 0x20)):
                    ch.ioport_write(reg, val)
                while fi.waiting == 0:
                    time.sleep(0.001)
            else:
                n, count = int(fault.get("n", 1)), int(fault.get("count", 1))
                fi.fail_nth(n, op=fault["op"], count=count)
        delay = cfg.get("delay_at", {}).get(name)
        if delay:
            time.sleep(float(delay))
        cmd = cfg.get("exec_at", {}).get(name)
        if cmd:
            subprocess.run(cmd, check=True, timeout=10)
        if cfg.get("cancel_at") == name:
            cancel.set()

    def on_progress(prog: dict[str, Any]) -> None:
        # the test watches the copy from outside (kill or stop the destination mid-copy)
        line = {k: prog[k] for k in ("bytes_done", "bytes_total", "passes", "state")}
        with open(cfg["progress_file"], "a") as f:
            f.write(json.dumps(line) + "\n")

    if cfg.get("cancel_file"):
        # the operator's cancel, from outside: the test creates the file mid-copy
        def watch_cancel() -> None:
            while not os.path.exists(cfg["cancel_file"]):
                time.sleep(0.01)
            cancel.set()

        threading.Thread(target=watch_cancel, daemon=True).start()

    m: Machine | None = None
    wl: GuestWorkload | None = None
    try:
        if role == "source":
            if cfg.get("mbr"):
                # the source host repartitions the disk before its guest starts
                with blockemu.open_image(cfg["ide"], format="raw") as n:
                    n.write(0, bytes.fromhex(cfg["mbr"]))
                    n.flush()
            m, wl, holder["faults"] = build(cfg, source=True)
            holder["m"] = m
            m.start()
            if wl is not None:
                if wl.ata is not None:
                    wl.ata.probe()
                if wl.virtio is not None:
                    wl.virtio.probe()
                m.add_vcpu("cpu0", wl)
                wl.resume()
                time.sleep(float(cfg["workload"].get("run_for", 0.2)))
            try:
                out["report"] = migrate(
                    m,
                    cfg["uri"],
                    timeout=float(cfg.get("timeout", 10.0)),
                    timeouts=timeouts,
                    cancel=cancel if cfg.get("cancel_at") or cfg.get("cancel_file") else None,
                    on_phase=on_phase,
                    verify=cfg.get("verify", "witness"),
                    records=records,
                    storage=cfg.get("storage", "shared"),
                    mirror=MirrorOptions(**cfg.get("mirror", {})),
                    on_progress=on_progress if cfg.get("progress_file") else None,
                )
                out["ok"] = True
            except MigrationError as e:
                out["ok"] = False
                out["error"] = _error_info(e)
            out["migrate_end"] = time.monotonic()
            out["running_after"] = m.running
            out["state_after"] = m.state
            if "end" in peek:
                out["peeks"]["end"] = _peek(peek["end"])
            if cfg.get("close_peek") and not m.running:
                # the retired source closes its (inactive) nodes: that must write nothing
                time.sleep(float(cfg.get("before_close", 0)))
                before = _peek(cfg["close_peek"])
                out["nodes"] = _node_info(m)
                for _, node in m.iter_nodes():
                    node.close()
                out["close_peeks"] = {"before": before, "after": _peek(cfg["close_peek"])}
            if cfg.get("release_after"):
                for fi in holder["faults"].values():
                    fi.release()
            if m.running and wl is not None:
                time.sleep(float(cfg.get("after", 0.1)))
                wl.pause()  # the guest stops writing; the devices keep serving its reads
                out["check"] = wl.check()
                m.stop()
        else:

            def factory() -> Machine:
                if cfg.get("open_error"):
                    raise FileNotFoundError(2, "No such file or directory", cfg["open_error"])
                mm, w, holder["faults"] = build(cfg, source=False)
                holder["m"], holder["wl"] = mm, w
                if w is not None:
                    mm.add_vcpu("cpu0", w)
                return mm

            def ready(uri: str) -> None:
                if cfg.get("ready_file"):
                    Path(cfg["ready_file"]).write_text(uri)

            try:
                out["report"] = incoming(
                    factory,
                    cfg["uri"],
                    timeout=float(cfg.get("timeout", 10.0)),
                    timeouts=timeouts,
                    on_phase=on_phase,
                    ready=ready,
                    autostart=bool(cfg.get("autostart", True)),
                    records=records,
                    storage=cfg.get("storage", "shared"),
                )
                out["ok"] = True
            except MigrationError as e:
                out["ok"] = False
                out["error"] = _error_info(e)
            out["migrate_end"] = time.monotonic()
            nxt = cfg.get("then_migrate")
            if out["ok"] and nxt:
                # a second hop from here, typically of a machine that never started here
                out["nodes_between"] = _node_info(holder["m"])
                out["state_between"] = holder["m"].state
                try:
                    out["report2"] = migrate(
                        holder["m"],
                        nxt["uri"],
                        timeout=float(nxt.get("timeout", 10.0)),
                        timeouts=timeouts,
                        on_phase=on_phase,
                    )
                    out["ok2"] = True
                except MigrationError as e:
                    out["ok2"] = False
                    out["error2"] = _error_info(e)
            m = holder.get("m")
            wl = holder.get("wl")
            if m is not None:
                if wl is None:
                    # no guest of ours runs: the ATA driver is free for a look
                    _hazard_view(m, out)
                out["state_after"] = m.state
                out["running_after"] = m.running
                if m.running and wl is not None:
                    time.sleep(float(cfg.get("after", 0.1)))
                    wl.pause()  # the guest stops writing; the devices keep serving its reads
                    if wl.error is not None:
                        out["guest_error"] = repr(wl.error)
                    out["check"] = wl.check()
                    m.stop()
                    if "end" in peek:
                        out["peeks"]["end"] = _peek(peek["end"])
        if wl is not None:
            if wl.error is not None:
                out["guest_error"] = repr(wl.error)
            out["guest_steps"] = wl.seq
            if cfg.get("report_acked"):
                out["acked"] = {d: sorted(a.items()) for d, a in wl.acked.items()}
        if m is not None and "close_peeks" not in out:
            out["nodes"] = _node_info(m)
    except BaseException as e:
        out["ok"] = False
        out["crash"] = "".join(traceback.format_exception(e))
    print(json.dumps(out), flush=True)
    hold = float(cfg.get("hold", 0))
    if hold:
        time.sleep(hold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
