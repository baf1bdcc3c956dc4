"""Property tests of blockemu's VirtioBlk against hostile drivers (spec §6, §10 scenario 37).

Random descriptor tables, avail entries and guest memory contents go to the device through its
registers (tests/virtio_fuzz.py builds and checks one program); random register traffic goes to
the register file. Invariants: nothing but documented errors is raised, every MMIO call returns
promptly, guest memory outside device-writable descriptor ranges is unchanged, and the device
ends healthy or NEEDS_RESET — after which a reset and a normal init work.

A few hundred examples in all (the suite has a 300 s budget on a 2-core machine).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockemu.drivers import VirtioBlkDriver
from blockemu.drivers import virtio as v
from virtio_fuzz import run_random_program
from virtio_targets import BlockemuVirtio, blockemu_has_virtio, make_image

if not blockemu_has_virtio():
    pytest.skip("blockemu.VirtioBlk does not exist yet", allow_module_level=True)

EXAMPLES = int(os.environ.get("VIRTIO_HYPOTHESIS_EXAMPLES", "250"))  # more for a deep local run
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    img = make_image(tmp_path_factory.mktemp("vhyp") / "disk.img", 4 << 20, seed=4)
    t = BlockemuVirtio(Path(img), queue_size=16, memory_size=16 << 20)
    yield t
    t.close()


@SETTINGS
@given(blob=st.binary(min_size=8, max_size=64))
def test_random_rings(target: Any, blob: bytes) -> None:
    d = VirtioBlkDriver(target, target.memory, queue_size=16)
    assert run_random_program(d, blob) in ("ok", "needs-reset")


@SETTINGS
@given(blob=st.binary(min_size=8, max_size=64))
def test_random_rings_without_event_idx_and_indirect(target: Any, blob: bytes) -> None:
    d = VirtioBlkDriver(target, target.memory, queue_size=8, event_idx=False, indirect=False)
    assert run_random_program(d, blob) in ("ok", "needs-reset")


REGS = [0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044,
        0x050, 0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x0AC, 0x0B0,
        0x0C0, 0x0FC]  # fmt: skip

access = st.one_of(
    st.tuples(st.sampled_from(REGS), st.integers(0, 0xFFFF_FFFF), st.just(4)),
    st.tuples(st.integers(0x100, 0x1FF), st.integers(0, 0xFF), st.just(1)),
    st.tuples(st.integers(0x80, 0xFF).map(lambda x: 2 * x), st.integers(0, 0xFFFF), st.just(2)),
    st.tuples(st.integers(0, 0x7F).map(lambda x: 4 * x), st.integers(0, 0xFFFF_FFFF), st.just(4)),
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(ops=st.lists(st.tuples(st.booleans(), access), max_size=40))
def test_random_register_traffic(target: Any, ops: list[tuple[bool, tuple[int, int, int]]]) -> None:
    d = VirtioBlkDriver(target, target.memory, queue_size=16)
    d.probe()
    for is_write, (off, value, size) in ops:
        t0 = time.monotonic()
        if is_write:
            if off == v.REG_QUEUE_NOTIFY:
                continue  # notifies are exercised with well-formed rings above
            target.mmio_write(off, value, size)
        else:
            assert 0 <= target.mmio_read(off, size) < 1 << (8 * size)
        assert time.monotonic() - t0 < 1
    d.reset()
    d.probe()
    assert len(d.read(0, 8)) == 4096
