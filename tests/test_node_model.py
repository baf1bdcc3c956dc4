"""Random read/write/flush/inactivate/activate sequences against a bytearray model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import blockemu

SIZE = 64 * 1024
offsets = st.integers(min_value=0, max_value=SIZE)
lengths = st.integers(min_value=0, max_value=9000)


class NodeModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "model.img"
        blockemu.create_image(self.path, SIZE)
        self.node = blockemu.open_image(self.path)
        self.model = bytearray(SIZE)
        self.active = True

    @rule(offset=offsets, data=st.binary(max_size=9000))
    def write(self, offset: int, data: bytes) -> None:
        if not self.active:
            try:
                self.node.write(offset, data)
            except blockemu.InactiveError:
                return
            raise AssertionError("write on an inactive node succeeded")
        if offset + len(data) > SIZE:
            try:
                self.node.write(offset, data)
            except blockemu.OutOfRangeError:
                return
            raise AssertionError("write past the end succeeded")
        self.node.write(offset, data)
        self.model[offset : offset + len(data)] = data

    @rule(offset=offsets, length=lengths)
    def read(self, offset: int, length: int) -> None:
        if not self.active:
            try:
                self.node.read(offset, length)
            except blockemu.InactiveError:
                return
            raise AssertionError("read on an inactive node succeeded")
        if offset + length > SIZE:
            try:
                self.node.read(offset, length)
            except blockemu.OutOfRangeError:
                return
            raise AssertionError("read past the end succeeded")
        assert self.node.read(offset, length) == self.model[offset : offset + length]

    @precondition(lambda self: self.active)
    @rule()
    def flush(self) -> None:
        self.node.flush()

    @rule()
    def inactivate(self) -> None:
        before = self.node.stats()["writes"]
        self.node.inactivate()
        self.active = False
        assert self.node.stats()["writes"] == before

    @rule()
    def activate(self) -> None:
        self.node.activate()
        self.active = True

    @invariant()
    def state_matches(self) -> None:
        assert self.node.active == self.active

    def teardown(self) -> None:
        self.node.close()
        # Everything written (and never lost across inactivate/activate) is in the file.
        assert self.path.read_bytes() == bytes(self.model)
        self.dir.cleanup()


NodeModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestNodeModel = NodeModel.TestCase
