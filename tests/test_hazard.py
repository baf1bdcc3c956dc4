"""The hazard this project exists for (DESIGN.md, the 2010 thread; specs/migration.md §13,
scenarios 14 and 15), shown on one machine.

Two models make it reproducible: ``open_image(..., host_cache=True)`` (each node is one NFS
client of the shared image: it serves pages it read earlier until activation revalidates them)
and ``open_image(..., cor_cache=PATH)`` (a copy-on-read cache file whose blocks carry the epoch
they were filled in; activation starts a new one). ``geometry_policy="eager"`` is QEMU before
2010: the device reads sector 0 at creation, and ``revalidate=False`` is a host that never
re-opens. The hand-overs in the first tests are what QEMU did then (stop, save, load, activate,
with none of the coordinator's checks); the two-process tests use the real migration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import blockemu
from blockemu import IdeChannel, IdeDisk, Machine
from blockemu.drivers import AtaDriver
from migration_harness import FAST, make_disk, start_peer, uri_pair, wait_file

SIZE = 2 << 20


def mbr(end_head: int, end_sector: int) -> bytes:
    """A one-partition MBR whose end CHS makes QEMU guess `end_head + 1` heads."""
    sector = bytearray(512)
    e = 0x1BE
    sector[e + 1 : e + 4] = bytes([1, 1, 0])
    sector[e + 4] = 0x83
    sector[e + 5] = end_head
    sector[e + 6] = end_sector & 0x3F
    sector[e + 7] = 0xFF
    sector[e + 8 : e + 12] = (63).to_bytes(4, "little")
    sector[e + 12 : e + 16] = (1000).to_bytes(4, "little")
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


OLD = mbr(15, 63)  # 16 heads, 63 sectors
NEW = mbr(3, 32)  # 4 heads, 32 sectors: the source's repartition


def image(tmp: Path, name: str = "disk.img") -> Path:
    path = make_disk(tmp / name, SIZE)
    with open(path, "r+b") as f:
        f.write(OLD)
    return path


class Host:
    """One host's machine: an IDE disk over its own open of the shared image."""

    def __init__(self, path: Path, *, active: bool, policy: str = "lazy", **opts: Any) -> None:
        self.node = blockemu.open_image(path, format="raw", active=active, **opts)
        self.node.enable_trace()
        self.disk = IdeDisk(self.node, geometry_policy=policy)  # type: ignore[arg-type]
        self.ch = IdeChannel(master=self.disk)
        self.m = Machine()
        self.m.add("ide0", self.ch)
        self.ata = AtaDriver(self.ch, timeout=5.0)

    def boot(self) -> tuple[int, int]:
        """Starts the guest; returns the (heads, secs) its BIOS sees."""
        self.m.start()
        p = self.ata.probe()
        return p["heads"], p["secs"]

    def sector0(self) -> bytes:
        return self.ata.read(0, 1)

    def close(self) -> None:
        if self.m.running:
            self.m.stop()
        self.node.close()


def handover(src: Host, dst: Host) -> None:
    """Migration as QEMU did it in 2010: no reads-before-activation or witness checks."""
    src.m.stop()
    state = src.m.save_state()
    src.m.inactivate()
    dst.m.load_state(state)
    dst.m.activate()
    dst.m.start()


def reads_before_activation(node: blockemu.BlockNode) -> int:
    n = 0
    for e in node.trace():
        if e["op"] == "activate":
            break
        if e["op"] in ("read", "cache_hit"):
            n += 1
    return n


# ------------------------------------------------------------- scenario 14: stale MBR


def test_14_eager_destination_keeps_the_stale_geometry(tmp_path: Path) -> None:
    path = image(tmp_path)
    # The destination is created first (waiting for the migration) and reads sector 0 at once.
    dst = Host(path, active=False, policy="eager", host_cache=True)
    assert dst.node.stats()["reads"] == 1 and reads_before_activation(dst.node) == 1
    assert [e["active"] for e in dst.node.trace() if e["op"] == "read"] == [False]
    assert dst.disk.geometry is not None and dst.disk.geometry.heads == 16
    # The source host repartitions (new MBR, flushed), boots its guest and migrates.
    with blockemu.open_image(path, format="raw") as n:
        n.write(0, NEW)
        n.flush()
    src = Host(path, active=True, host_cache=True)
    assert src.boot() == (4, 32)
    handover(src, dst)
    # Corruption: the guest on the destination sees the geometry of the old partition table.
    assert dst.ata.probe()["heads"] == 16 and dst.ata.probe()["secs"] == 63
    # Activation revalidated the host cache: the data is fresh, only the geometry is stale.
    assert dst.sector0() == NEW
    src.close()
    dst.close()


def test_14_without_revalidation_the_guest_reads_the_stale_sector(tmp_path: Path) -> None:
    path = image(tmp_path)
    dst = Host(path, active=False, policy="eager", host_cache=True, revalidate=False)
    with blockemu.open_image(path, format="raw") as n:
        n.write(0, NEW)
        n.flush()
    src = Host(path, active=True, host_cache=True)
    src.boot()
    handover(src, dst)
    # The page the destination's host read before the repartition is served to the guest.
    assert dst.sector0() == OLD
    st = dst.node.stats()
    assert st["cache_hits"] >= 1 and st["reads"] == 1  # the early read only
    src.close()
    dst.close()


def test_14_lazy_destination_sees_the_new_geometry_and_reads_nothing_early(
    tmp_path: Path,
) -> None:
    path = image(tmp_path)
    dst = Host(path, active=False, host_cache=True)
    with blockemu.open_image(path, format="raw") as n:
        n.write(0, NEW)
        n.flush()
    src = Host(path, active=True, host_cache=True)
    assert src.boot() == (4, 32)
    assert dst.node.stats()["reads"] == 0
    handover(src, dst)
    assert reads_before_activation(dst.node) == 0
    p = dst.ata.probe()
    assert (p["heads"], p["secs"]) == (4, 32)  # the geometry travelled in the state
    assert dst.sector0() == NEW
    src.close()
    dst.close()


def test_host_cache_serves_stale_pages_until_activation(tmp_path: Path) -> None:
    """The model alone: two hosts of one file, close-to-open consistency."""
    path = image(tmp_path)
    b = blockemu.open_image(path, format="raw", readonly=True, host_cache=True)
    assert b.read(0, 512) == OLD
    assert b.cached_blocks() == 1
    with open(path, "r+b") as f:  # another host writes the shared file
        f.write(NEW)
    assert b.read(0, 512) == OLD  # this host still has its page
    st = b.stats()
    assert (st["reads"], st["cache_hits"], st["cache_bytes_read"]) == (1, 1, 512)
    b.inactivate()
    b.activate()  # re-open: revalidation
    assert b.cached_blocks() == 0
    assert b.read(0, 512) == NEW
    assert b.stats()["reads"] == 2
    b.close()
    with blockemu.open_image(path, format="raw", host_cache=True) as a:
        assert a.read(0, 512) == NEW
        a.write(0, OLD)
        assert a.read(0, 512) == OLD  # a host sees its own writes (in its cached page)
        assert a.stats()["cache_hits"] == 1
    plain = blockemu.open_image(path, format="raw")
    assert plain.cached_blocks() is None and plain.stats()["cache_hits"] == 0
    plain.close()


# -------------------------------------------------- scenario 15: copy-on-read pollution

X = 64 << 10  # block X, written by the source just before the hand-over


def test_15_early_read_pollutes_a_cache_that_is_not_dropped(tmp_path: Path) -> None:
    path = image(tmp_path)
    dst = Host(path, active=False, policy="eager", cor_cache=tmp_path / "dst.cor", revalidate=False)
    assert dst.node.cached_blocks() == 1  # the early read filled the cache with OLD
    src = Host(path, active=True)
    src.boot()
    src.ata.write(0, NEW)
    src.ata.flush()
    handover(src, dst)
    assert dst.sector0() == OLD  # corruption: the stale block is served after the hand-over
    assert dst.node.stats()["cache_hits"] >= 1
    src.close()
    dst.close()


def test_15_eager_read_is_dropped_at_activation(tmp_path: Path) -> None:
    path = image(tmp_path)
    dst = Host(path, active=False, policy="eager", cor_cache=tmp_path / "dst.cor")
    assert dst.node.cached_blocks() == 1
    src = Host(path, active=True)
    src.boot()
    src.ata.write(0, NEW)
    src.ata.flush()
    handover(src, dst)
    assert dst.sector0() == NEW  # the epoch changed at activation: the early block is gone
    src.close()
    dst.close()


def test_15_lazy_destination_reads_fresh_and_hits_only_blocks_filled_after_activation(
    tmp_path: Path,
) -> None:
    path = image(tmp_path)
    cor = tmp_path / "dst.cor"
    dst = Host(path, active=False, cor_cache=cor)
    src = Host(path, active=True)
    src.boot()
    src.ata.write(X // 512, b"\xab" * 4096)
    src.ata.flush()
    handover(src, dst)
    assert dst.node.cached_blocks() is not None
    # Nothing was cached at activation; the first read of X goes to the shared image.
    before = dst.node.stats()
    assert dst.ata.read(X // 512, 8) == b"\xab" * 4096
    mid = dst.node.stats()
    assert mid["reads"] > before["reads"]
    assert dst.ata.read(X // 512, 8) == b"\xab" * 4096
    assert dst.node.stats()["cache_hits"] > mid["cache_hits"]
    # Every cache hit is of a block read from storage after activation.
    trace = dst.node.trace()
    act = next(i for i, e in enumerate(trace) if e["op"] == "activate" and e["outcome"] == "ok")
    assert not any(e["op"] in ("read", "cache_hit") for e in trace[:act])
    filled: set[int] = set()
    for e in trace[act:]:
        blocks = set(range(e["offset"] // 4096, (e["offset"] + e["length"] - 1) // 4096 + 1))
        if e["op"] == "read":
            filled |= blocks
        elif e["op"] == "cache_hit":
            assert blocks <= filled, e
    src.close()
    dst.close()


@pytest.mark.parametrize("revalidate", [True, False])
def test_15_ping_pong_a_b_a(tmp_path: Path, revalidate: bool) -> None:
    path = image(tmp_path)
    a = Host(path, active=True, cor_cache=tmp_path / "a.cor", revalidate=revalidate)
    b = Host(path, active=False, cor_cache=tmp_path / "b.cor")
    a.boot()
    assert a.ata.read(X // 512, 8) == bytes(4096)  # A caches block X
    handover(a, b)
    b.ata.write(X // 512, b"\xcd" * 4096)
    b.ata.flush()
    # B → A: A was inactive all along, its node (and cache file) kept.
    b.m.stop()
    state = b.m.save_state()
    b.m.inactivate()
    a.m.load_state(state)
    a.m.activate()
    a.m.start()
    got = a.ata.read(X // 512, 8)
    if revalidate:
        assert got == b"\xcd" * 4096  # A's block of the old epoch was invalidated
    else:
        assert got == bytes(4096)  # the hazard: A serves what it cached in its first turn
    a.close()
    b.close()


def test_15_cache_epoch_survives_a_restart(tmp_path: Path) -> None:
    """A's cache file outlives A's process: a new open still refuses the old blocks once it
    is activated."""
    path = image(tmp_path)
    cor = tmp_path / "a.cor"
    with blockemu.open_image(path, format="raw", cor_cache=cor) as n:
        n.read(X, 4096)
    with open(path, "r+b") as f:
        f.seek(X)
        f.write(b"\xee" * 4096)
    n = blockemu.open_image(path, format="raw", active=False, cor_cache=cor)
    n.activate()
    assert n.cached_blocks() == 0
    assert n.read(X, 4096) == b"\xee" * 4096
    n.close()


# ---------------------------------------------- the same across two processes (migration)


def run_pair(tmp: Path, dst: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    img = make_disk(tmp / "ide.img", SIZE)
    with open(img, "r+b") as f:
        f.write(OLD)
    uri = uri_pair(tmp, "unix")
    ready = tmp / "ready"
    base = {"ide": str(img), "timeouts": FAST, "timeout": 15.0, "host_cache": True}
    d = start_peer(
        {**base, "role": "destination", "uri": uri, "ready_file": str(ready), **dst}, tmp
    )
    wait_file(ready)
    s = start_peer({**base, "role": "source", "uri": uri, "mbr": NEW.hex()}, tmp)
    return s.result(), d.result()


def test_14_15_lazy_migration_across_processes(tmp_path: Path) -> None:
    s, d = run_pair(tmp_path, {"cor_cache": str(tmp_path)})
    assert s["ok"], s
    assert d["ok"], d
    assert set(d["report"]["reads_before_activation"].values()) == {0}
    assert d["ide_geometry"][1:] == [4, 32]
    assert d["ide_sector0"] == NEW.hex()
    (node,) = d["nodes"].values()
    assert node["stats"]["reads"] > 0 and node["cached_blocks"] > 0


def test_14_eager_destination_is_refused_by_the_coordinator(tmp_path: Path) -> None:
    """With the coordinator, the early read is caught (reads before activation): the
    destination gives up, the source takes its image back and resumes."""
    s, d = run_pair(tmp_path, {"geometry_policy": "eager"})
    assert not d["ok"]
    assert "before activation" in d["error"]["message"], d["error"]
    assert not s["ok"] and s["error"]["source_resumed"], s


def test_eager_policy_on_virtio_and_bad_policy(tmp_path: Path) -> None:
    from blockemu import GuestMemory, VirtioBlk

    path = image(tmp_path)
    ram = GuestMemory(1 << 20)
    lazy = blockemu.open_image(path, format="raw", active=False)
    VirtioBlk(lazy, ram)
    assert lazy.stats()["reads"] == 0
    eager = blockemu.open_image(path, format="raw", active=False)
    eager.enable_trace()
    VirtioBlk(eager, ram, geometry_policy="eager")
    assert eager.stats()["reads"] == 1
    assert [(e["op"], e["active"]) for e in eager.trace()] == [("read", False)]
    with pytest.raises(ValueError, match="geometry_policy"):
        VirtioBlk(lazy, ram, geometry_policy="early")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="geometry_policy"):
        IdeDisk(lazy, geometry_policy="early")  # type: ignore[arg-type]
    lazy.close()
    eager.close()
