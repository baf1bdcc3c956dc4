"""Migration across two network namespaces joined by a veth pair: the source and destination
processes see each other only through a real (virtual) network link. Skipped where ``ip netns``
is not allowed (not root, no CAP_SYS_ADMIN, a container without it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_migration_e2e import completed, run_pair


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    """Two namespaces ``(src_ns, dst_ns, dst_addr)`` joined by a veth pair."""
    if shutil.which("ip") is None:
        pytest.skip("no ip(8)")
    tag = f"{os.getpid() % 10000}"
    src, dst = f"bemu-s{tag}", f"bemu-d{tag}"
    r = _ip("netns", "add", src)
    if r.returncode != 0:
        pytest.skip(f"ip netns add not allowed here: {r.stderr.strip()}")
    try:
        sub = 10 + os.getpid() % 200
        steps = [
            ("netns", "add", dst),
            ("link", "add", f"vs{tag}", "type", "veth", "peer", "name", f"vd{tag}"),
            ("link", "set", f"vs{tag}", "netns", src),
            ("link", "set", f"vd{tag}", "netns", dst),
            ("-n", src, "addr", "add", f"10.213.{sub}.1/24", "dev", f"vs{tag}"),
            ("-n", dst, "addr", "add", f"10.213.{sub}.2/24", "dev", f"vd{tag}"),
            ("-n", src, "link", "set", f"vs{tag}", "up"),
            ("-n", dst, "link", "set", f"vd{tag}", "up"),
            ("-n", src, "link", "set", "lo", "up"),
            ("-n", dst, "link", "set", "lo", "up"),
        ]
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                pytest.skip(f"ip {' '.join(step)}: {r.stderr.strip()}")
        yield src, dst, f"10.213.{sub}.2"
    finally:
        _ip("netns", "del", src)
        _ip("netns", "del", dst)


def test_migration_across_namespaces(tmp_path: Path, netns: tuple[str, str, str]) -> None:
    src, dst, addr = netns
    run = run_pair(
        tmp_path,
        dst_uri=f"tcp:{addr}:4777",
        wrap_src=["ip", "netns", "exec", src],
        wrap_dst=["ip", "netns", "exec", dst],
    )
    completed(run)


def test_12_link_down_after_source_inactive(tmp_path: Path, netns: tuple[str, str, str]) -> None:
    """Scenario 12 on a real link: the source takes its veth down as it hands off. The
    destination activates, commits and runs; the source cannot reach it, cannot take the lock,
    reads the ownership record and retires without resuming."""
    src, dst, addr = netns
    tag = src.removeprefix("bemu-s")
    run = run_pair(
        tmp_path,
        dst_uri=f"tcp:{addr}:4778",
        wrap_src=["ip", "netns", "exec", src],
        wrap_dst=["ip", "netns", "exec", dst],
        src={
            # SOURCE_INACTIVE is on the wire first (a short delay), then the link goes down
            "delay_at": {"handed_off": 0.05},
            "exec_at": {"handed_off": ["ip", "link", "set", f"vs{tag}", "down"]},
        },
        dst={"delay_at": {"activating": 0.3}},  # its answers come after the link is down
    )
    completed(run)
    assert run.src["report"]["resolved_by"] == "ownership record"
