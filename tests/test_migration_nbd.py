"""Live migration over NBD shared storage (issue 7, scenario 4): one real qemu-nbd per disk
(Unix socket, shared by two clients) serves a raw image; a source and a destination process
(``tests/migration_peer.py``) both reach it through ``nbd+unix://`` URIs, with a guest workload on
IDE and virtio-blk.

An NBD client holds no file lock, so the coordinator alone keeps a single writer. Fenced mode:
the ownership records live at paths the caller gives (``records=``); simple mode (no records):
the handover works, but an in-doubt source never resolves on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockemu import _core
from blockemu.migration import read_record_at
from blockemu.migration.frames import Msg
from blockemu.migration.ownership import is_lockless, resolve_records
from migration_harness import (
    FAST,
    Proxy,
    check_acked_on_images,
    make_disk,
    read_ack_log,
    start_peer,
    uri_pair,
    wait_file,
)
from nbd_peers import QemuNbd, short_dir

from peers import require_tool

pytestmark = pytest.mark.skipif(
    not hasattr(_core, "save_state"), reason="device-state encoding not in this build"
)

NODES = {"ide": "ide0.master", "virtio": "vblk0"}


@dataclass
class NbdRun:
    src: dict[str, Any]
    dst: dict[str, Any]
    files: dict[str, Path]
    records: dict[str, Path] | None
    acked: dict[str, dict[int, int]]


@pytest.fixture
def nbd_pair() -> Iterator[Any]:
    """Runs one migration over NBD; the qemu-nbd servers are stopped (by pid) before it
    returns, so the image files can be read afterwards."""
    qemu_nbd = require_tool("qemu-nbd")
    servers: list[QemuNbd] = []

    def run(*, fenced: bool, rule: Any = None, env_dst: dict[str, str] | None = None) -> NbdRun:
        tmp = short_dir()
        files = {k: make_disk(tmp / f"{k}.img") for k in NODES}
        uris = {}
        for k, f in files.items():
            srv = QemuNbd(qemu_nbd, f, extra=("--shared=4",))
            servers.append(srv)
            uris[k] = srv.uri
        records = {k: tmp / f"{k}.owner" for k in NODES} if fenced else None
        ack_log = tmp / "acks.log"
        base: dict[str, Any] = {
            **uris,
            "timeouts": FAST,
            "timeout": 10.0,
            "workload": {"inflight": False, "run_for": 0.3, "ack_log": str(ack_log)},
        }
        if records is not None:
            base["records"] = {NODES[k]: str(p) for k, p in records.items()}
        dst_uri = uri_pair(tmp, "unix")
        ready = tmp / "ready"
        d = start_peer(
            {
                **base,
                "role": "destination",
                "uri": dst_uri,
                "ready_file": str(ready),
                "stats_at": ["activating"],
            },
            tmp,
            env_dst,
        )
        wait_file(ready)
        proxy = None
        src_uri = dst_uri
        if rule is not None:
            src_uri = uri_pair(tmp, "unix")
            proxy = Proxy(src_uri, dst_uri, rule)
        s = start_peer({**base, "role": "source", "uri": src_uri}, tmp)
        rs, rd = s.result(), d.result()
        if proxy is not None:
            proxy.close()
        for srv in servers:
            srv.kill()
        for r in (rs, rd):
            assert "crash" not in r, r["crash"]
        acked = read_ack_log(ack_log)
        # INV-5: every acknowledged write is on the image, read from the file itself
        check_acked_on_images(acked, files)
        return NbdRun(rs, rd, files, records, acked)

    yield run
    for srv in servers:
        srv.kill()


@pytest.mark.parametrize("fenced", [True, False], ids=["records", "simple"])
def test_nbd_happy_path(nbd_pair: Any, fenced: bool) -> None:
    run = nbd_pair(fenced=fenced)
    s, d = run.src, run.dst
    assert d["ok"], d
    assert s["ok"], s
    mode = "fenced" if fenced else "simple"
    assert s["report"]["ownership"] == mode and d["report"]["ownership"] == mode
    # the destination's NBD nodes issued no command before activation (node stats)
    rep = d["report"]
    assert set(rep["reads_before_activation"].values()) == {0}
    assert set(rep["writes_before_activation"].values()) == {0}
    assert set(rep["reads_before_activation"]) == set(NODES.values())
    # every counter (reads, writes, flushes, discards, write-zeroes, errors), just before
    # activate(): not one NBD command
    before = d["stats_at"]["activating"]
    assert set(before) == set(NODES.values())
    for name, st in before.items():
        assert not any(st.values()), (name, st)
    # the source retired: paused for good, inactive nodes; no NBD node holds a lock
    assert s["running_after"] is False and s["state_after"] == "postmigrate"
    for name, info in s["nodes"].items():
        assert not info["active"], name
        assert info["locks"]["held"] == [], name
    for name, info in d["nodes"].items():
        assert info["active"], name
        assert info["locks"]["held"] == [], name
        assert info["stats"]["writes"] > 0, name  # the guest ran on at the destination
    assert d["check"]["ide"] > 0 and d["check"]["virtio"] > 0
    assert "guest_error" not in d, d["guest_error"]
    assert sum(len(v) for v in run.acked.values()) > 0
    if fenced:
        assert run.records is not None
        for path in run.records.values():
            rec = read_record_at(path)
            assert rec is not None and rec.role == "destination" and rec.epoch == rep["epoch"]
    # nothing is written beside the image files (there is no image file for an NBD node here)
    for f in run.files.values():
        assert not Path(f"{f}.owner").exists()


def _drop_commit(direction: str, mtype: int, index: int, raw: bytes) -> str:
    return "drop_rest" if mtype == Msg.DEST_COMMITTED else "pass"


@pytest.mark.parametrize("fenced", [True, False], ids=["records", "simple"])
def test_nbd_destination_killed_after_commit(nbd_pair: Any, fenced: bool) -> None:
    """Scenario 11 over NBD: the destination commits and dies, DEST_COMMITTED never reaches the
    source. No lock can tell the source anything: with records it retires by reading them at
    the given paths; in simple mode it stays paused and in doubt (an operator decides)."""
    run = nbd_pair(
        fenced=fenced, rule=_drop_commit, env_dst={"BLOCKEMU_MIGRATION_KILL_AT": "dst:after_commit"}
    )
    assert run.dst.get("killed"), run.dst
    s = run.src
    assert s["running_after"] is False
    for name, info in s["nodes"].items():
        assert not info["active"], name
    if fenced:
        assert s["ok"], s
        assert s["report"]["resolved_by"] == "ownership record"
        assert s["state_after"] == "postmigrate"
        assert run.records is not None
        for path in run.records.values():
            rec = read_record_at(path)
            assert rec is not None and rec.role == "destination" and rec.epoch == 2
    else:
        assert not s["ok"], s
        err = s["error"]
        assert err["phase"] == "in_doubt" and err["source_resumed"] is False, err
        assert "simple mode" in err["message"]
        assert s["state_after"] == "paused"


def test_resolve_records() -> None:
    nbd = "nbd+unix:///exp?socket=/tmp/x.sock"
    images = {"vblk0": "/img/a.raw", "ide0.master": nbd}
    # a file keeps its sidecar; an NBD node without a record is simple mode (None)
    assert resolve_records(images, None) == {"vblk0": "/img/a.raw.owner", "ide0.master": None}
    got = resolve_records(images, {"ide0.master": Path("/shared/ide.owner")})
    assert got == {"vblk0": "/img/a.raw.owner", "ide0.master": "/shared/ide.owner"}
    assert is_lockless(nbd) and is_lockless("nbd://h:10809/e") and not is_lockless("/img/a")
    with pytest.raises(ValueError, match="unknown nodes"):
        resolve_records(images, {"vblk9": "/x.owner"})
