"""A scripted guest workload that runs as a machine's vCPU (:class:`~blockemu.machine.Vcpu`).

:class:`GuestWorkload` writes sequence-numbered sectors through an :class:`AtaDriver` (IDE) and a
:class:`VirtioBlkDriver` (virtio-blk) in a thread, step after step, until the machine stops it,
and remembers which writes were acknowledged (completed; flushed every ``flush_every`` steps).
Its state — the drivers' shadow state (ring indexes, free descriptors, requests in flight, the
IDE transfer settings) and the acknowledged writes — is what a real guest keeps in its CPU and
RAM; it travels with a migration, so the destination resumes the same guest mid-workload.

With ``inflight=True`` each virtio write is submitted in one step and collected in the next, so
the machine stops with a request in flight (spec §13 scenario 21): the device drains it at stop
and the destination's guest collects the completion after the migration.
"""

from __future__ import annotations

import random
import struct
import threading
import time
from typing import Any

from blockemu.drivers.ata import AtaDriver, parse_identify
from blockemu.drivers.virtio import T_OUT, Request, RingLayout, Submitted, VirtioBlkDriver

__all__ = [
    "GuestWorkload",
    "block_pattern",
    "pattern",
    "restore_ata",
    "restore_virtio",
    "save_ata",
    "save_virtio",
]

SECTOR = 512
_TAG = b"BLKEMU-W"
_RAMP = bytes(range(256)) * 4  # byte i of a sector's body is (start + i) & 0xFF


def pattern(device: str, seq: int, lba: int) -> bytes:
    """The 512 bytes the workload writes as write number ``seq`` to ``lba`` of ``device``."""
    head = _TAG + struct.pack("<QQ", seq, lba) + device.encode()[:16].ljust(16, b"\0")
    start = (seq * 7 + lba) & 0xFF
    return head + _RAMP[start : start + SECTOR - len(head)]


def block_pattern(device: str, seq: int, lba: int, sectors: int) -> bytes:
    """What write ``seq`` puts on ``sectors`` sectors from ``lba``: each sector's own pattern."""
    return b"".join(pattern(device, seq, lba + i) for i in range(sectors))


def save_ata(drv: AtaDriver) -> dict[str, Any]:
    ident = drv._ident
    return {
        "multiple": drv.multiple,
        "cyls": drv.cyls,
        "heads": drv.heads,
        "secs": drv.secs,
        "ident": None if ident is None else ident.hex(),
    }


def restore_ata(drv: AtaDriver, st: dict[str, Any]) -> None:
    drv.multiple = int(st["multiple"])
    drv.cyls, drv.heads, drv.secs = int(st["cyls"]), int(st["heads"]), int(st["secs"])
    ident = st.get("ident")
    drv._ident = None if ident is None else bytes.fromhex(ident)
    drv._info = None if drv._ident is None else parse_identify(drv._ident)


def _save_sub(s: Submitted) -> dict[str, Any]:
    r = s.request
    return {
        "type": r.type,
        "sector": r.sector,
        "data": r.data.hex(),
        "in_len": r.in_len,
        "req_status_len": r.status_len,
        "head": s.head,
        "addr": s.addr,
        "readable": s.readable,
        "sub_in_len": s.in_len,
        "status_len": s.status_len,
        "descs": list(s.descs),
        "table": s.table,
    }


def _load_sub(d: dict[str, Any]) -> Submitted:
    req = Request(
        int(d["type"]),
        int(d["sector"]),
        data=bytes.fromhex(d["data"]),
        in_len=int(d["in_len"]),
        status_len=int(d["req_status_len"]),
    )
    return Submitted(
        req,
        int(d["head"]),
        int(d["addr"]),
        int(d["readable"]),
        int(d["sub_in_len"]),
        int(d["status_len"]),
        [int(x) for x in d["descs"]],
        None if d["table"] is None else int(d["table"]),
    )


def save_virtio(drv: VirtioBlkDriver) -> dict[str, Any]:
    if drv._fast is not None:
        raise RuntimeError("release the fast read path before saving the driver")
    lay = drv.layout
    return {
        "device_features": drv.device_features,
        "features": drv.features,
        "queue_size": drv.queue_size,
        "layout": [lay.desc, lay.avail, lay.used, lay.data, lay.data_end],
        "avail_idx": drv.avail_idx,
        "last_used": drv.last_used,
        "free": list(drv._free),
        "alloc_next": drv._alloc_next,
        "inflight": [_save_sub(s) for s in drv._inflight.values()],
    }


def restore_virtio(drv: VirtioBlkDriver, st: dict[str, Any]) -> None:
    drv.device_features = int(st["device_features"])
    drv.features = int(st["features"])
    drv.queue_size = int(st["queue_size"])
    desc, avail, used, data, data_end = st["layout"]
    drv.layout = RingLayout(desc, avail, used, data, data_end)
    drv.avail_idx = int(st["avail_idx"])
    drv.last_used = int(st["last_used"])
    drv._free = [int(x) for x in st["free"]]
    drv._alloc_next = int(st["alloc_next"])
    drv._inflight = {}
    for d in st["inflight"]:
        sub = _load_sub(d)
        drv._inflight[sub.head] = sub
    drv._fast = None


class GuestWorkload:
    """See the module docs. ``base``/``span``: the sectors written (``base + seq % span``).

    ``stride``: sectors per write (writes start at multiples of it from ``base``);
    ``scatter``: each write goes to a pseudo-random block of the span (seeded by ``seq``)
    instead of the next one; ``rate``: bytes per second written per device, paced evenly (the
    steady writer of a mirror test), instead of ``step_delay`` between steps."""

    def __init__(
        self,
        *,
        ata: AtaDriver | None = None,
        virtio: VirtioBlkDriver | None = None,
        base: int = 64,
        span: int = 128,
        flush_every: int = 8,
        inflight: bool = False,
        step_delay: float = 0.0005,
        max_steps: int | None = None,
        ack_log: str | None = None,
        stride: int = 1,
        scatter: bool = False,
        rate: float | None = None,
    ) -> None:
        if stride < 1 or span < stride:
            raise ValueError("stride must be at least 1 and at most span")
        self.stride = stride
        self.scatter = scatter
        self.rate = rate
        self.ata = ata
        self.virtio = virtio
        self.base = base
        self.span = span
        self.flush_every = flush_every
        self.inflight = inflight
        self.step_delay = step_delay
        self.max_steps = max_steps
        self.seq = 0
        #: device → {lba: seq} of acknowledged writes (the last one per sector).
        self.acked: dict[str, dict[int, int]] = {"ide": {}, "virtio": {}}
        self.pending: tuple[int, int, int] | None = None  # (seq, lba, head) of a virtio write
        self.error: BaseException | None = None
        #: ``ack_log``: a file that gets one line ``device lba seq`` per acknowledged write (the
        #: guest's console: it survives the process, so tests can check acks after a SIGKILL).
        self._log = None if ack_log is None else open(ack_log, "a", buffering=1)
        self._cond = threading.Condition()
        self._want_run = False
        self._running = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ Vcpu

    def resume(self) -> None:
        with self._cond:
            self._want_run = True
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="vcpu", daemon=True)
                self._running = True
                self._thread.start()
            self._cond.notify_all()

    def pause(self) -> None:
        with self._cond:
            self._want_run = False
            self._cond.notify_all()
            while self._running:
                self._cond.wait(0.05)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def save(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "acked": {d: [[k, v] for k, v in m.items()] for d, m in self.acked.items()},
            "pending": list(self.pending) if self.pending is not None else None,
            "ata": None if self.ata is None else save_ata(self.ata),
            "virtio": None if self.virtio is None else save_virtio(self.virtio),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.seq = int(state["seq"])
        self.acked = {d: {int(k): int(v) for k, v in m} for d, m in state["acked"].items()}
        p = state.get("pending")
        self.pending = None if p is None else (int(p[0]), int(p[1]), int(p[2]))
        if self.ata is not None and state.get("ata") is not None:
            restore_ata(self.ata, state["ata"])
        if self.virtio is not None and state.get("virtio") is not None:
            restore_virtio(self.virtio, state["virtio"])

    # ------------------------------------------------------------------ the guest code

    def _loop(self) -> None:
        t0, seq0 = time.monotonic(), self.seq
        try:
            while True:
                with self._cond:
                    if not self._want_run or (
                        self.max_steps is not None and self.seq >= self.max_steps
                    ):
                        break
                self.step()
                if self.rate:
                    due = t0 + (self.seq - seq0) * self.stride * SECTOR / self.rate
                    with self._cond:
                        self._cond.wait_for(
                            lambda: not self._want_run, max(0.0, due - time.monotonic())
                        )
                elif self.step_delay:
                    with self._cond:
                        self._cond.wait_for(lambda: not self._want_run, self.step_delay)
        except BaseException as e:  # the guest "crashes": remember why
            self.error = e
        finally:
            with self._cond:
                self._running = False
                self._cond.notify_all()

    def collect(self) -> None:
        """Collects the virtio write in flight (inflight mode)."""
        if self.pending is None or self.virtio is None:
            return
        seq, lba, head = self.pending
        drv = self.virtio
        sub = drv._inflight.get(head)
        drv.wait_used(1)
        if sub is None or drv.status(sub) != 0:
            raise RuntimeError(f"virtio write {seq} to sector {lba} failed")
        self._ack("virtio", lba, seq)
        self.pending = None

    def _ack(self, dev: str, lba: int, seq: int) -> None:
        self.acked[dev][lba] = seq
        if self._log is not None:
            self._log.write(f"{dev} {lba} {seq}\n")

    def lba_of(self, seq: int) -> int:
        """The first sector write ``seq`` goes to."""
        blocks = self.span // self.stride
        if self.scatter:
            return self.base + random.Random(seq).randrange(blocks) * self.stride
        return self.base + seq % blocks * self.stride

    def step(self) -> None:
        seq = self.seq
        lba = self.lba_of(seq)
        n = self.stride
        if self.ata is not None:
            self.ata.write(lba, block_pattern("ide", seq, lba, n))
            self._ack("ide", lba, seq)
        if self.virtio is not None:
            data = block_pattern("virtio", seq, lba, n)
            if self.inflight:
                self.collect()
                (sub,) = self.virtio.submit([Request(T_OUT, lba, data=data)])
                self.pending = (seq, lba, sub.head)
            else:
                self.virtio.write(lba, data)
                self._ack("virtio", lba, seq)
        self.seq = seq + 1
        if self.flush_every and self.seq % self.flush_every == 0:
            if self.ata is not None:
                self.ata.flush()
            if self.virtio is not None and not self.inflight:
                self.virtio.flush()

    def check(self) -> dict[str, int]:
        """Reads back every acknowledged write through the drivers; raises AssertionError on the
        first difference. Returns the number of sectors checked per device."""
        self.collect()
        out = {}
        for dev, acked in self.acked.items():
            drv = self.ata if dev == "ide" else self.virtio
            if drv is None:
                continue
            for lba, seq in sorted(acked.items()):
                got = drv.read(lba, self.stride)
                want = block_pattern(dev, seq, lba, self.stride)
                if got != want:
                    tag = got[:8], struct.unpack("<QQ", got[8:24]) if got[:8] == _TAG else None
                    raise AssertionError(
                        f"{dev} sector {lba}: acknowledged write {seq} missing (found {tag})"
                    )
            out[dev] = len(acked)
        return out
