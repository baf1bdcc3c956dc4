"""A virtual machine: named devices, their guest RAM, optional vCPUs, and a run state.

A :class:`Machine` groups the devices a guest sees (``IdeChannel``, ``VirtioBlk``) and the guest's
RAM (``GuestMemory``). It knows the block nodes behind its devices, so the migration coordinator
(:mod:`blockemu.migration`) can inactivate and activate all of them, and it saves and loads the
devices' migratable state through the Rust core (``_core.save_state`` / ``_core.load_state``).

Run states (QEMU's names): ``created`` (never started), ``running``, ``paused`` (stopped, images
still owned), ``inmigrate`` (destination waiting for a migration), ``postmigrate`` (source after a
completed migration: paused, images inactive, never resumes), ``failed``.

A *vCPU* (:class:`Vcpu`) is whatever plays the guest's processor — a scripted workload driving the
drivers. :meth:`Machine.stop` pauses the vCPUs at an instruction boundary before it drains the
devices; their state (a JSON-able dict) travels with the migration.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Literal, Protocol, runtime_checkable

from blockemu import _core
from blockemu._core import BlockNode, GuestMemory, IdeChannel, VirtioBlk
from blockemu.errors import StateError

__all__ = ["Device", "Machine", "RunState", "Vcpu"]

Device = IdeChannel | VirtioBlk | GuestMemory
RunState = Literal["created", "running", "paused", "inmigrate", "postmigrate", "failed"]
_STATES = ("created", "running", "paused", "inmigrate", "postmigrate", "failed")


@runtime_checkable
class Vcpu(Protocol):
    """The guest's processor: runs guest code in its own thread between :meth:`resume` and
    :meth:`pause`."""

    def resume(self) -> None:
        """Run (or go on running) guest code."""

    def pause(self) -> None:
        """Stop at the next instruction boundary; returns once stopped."""

    def save(self) -> dict[str, Any]:
        """The processor state (JSON-able), taken while paused."""

    def load(self, state: dict[str, Any]) -> None:
        """Install a state from :meth:`save`, while paused."""


class Machine:
    """Named devices and their run state. See the module docs."""

    def __init__(self) -> None:
        self._devices: dict[str, Device] = {}
        self._vcpus: dict[str, Vcpu] = {}
        self._state: RunState = "created"

    # ------------------------------------------------------------------ building

    def add(self, name: str, device: Device) -> Device:
        """Adds ``device`` under ``name`` (unique); returns it."""
        if not isinstance(device, IdeChannel | VirtioBlk | GuestMemory):
            raise TypeError(
                "a machine holds IdeChannel, VirtioBlk and GuestMemory,"
                f" not {type(device).__name__}"
            )
        if not name or name in self._devices or name in self._vcpus:
            raise ValueError(f"device name {name!r} is empty or already used")
        self._devices[name] = device
        return device

    def add_vcpu(self, name: str, vcpu: Vcpu) -> Vcpu:
        """Adds a vCPU; it is resumed by :meth:`start` and paused by :meth:`stop`."""
        if not name or name in self._vcpus or name in self._devices:
            raise ValueError(f"vCPU name {name!r} is empty or already used")
        self._vcpus[name] = vcpu
        return vcpu

    @property
    def devices(self) -> dict[str, Device]:
        """The devices by name (a copy)."""
        return dict(self._devices)

    @property
    def vcpus(self) -> dict[str, Vcpu]:
        return dict(self._vcpus)

    # ------------------------------------------------------------------ run state

    @property
    def state(self) -> RunState:
        return self._state

    def set_state(self, state: RunState) -> None:
        """Sets the run state label (the migration coordinator uses this)."""
        if state not in _STATES:
            raise ValueError(f"unknown run state {state!r}")
        self._state = state

    @property
    def running(self) -> bool:
        return self._state == "running"

    def start(self) -> None:
        """Starts every device (IDE and virtio-blk ``start()``: lazy geometry prefetch begins),
        then resumes the vCPUs."""
        if self._state in ("postmigrate", "failed"):
            raise RuntimeError(f"a machine in state {self._state!r} cannot be started")
        for dev in self._devices.values():
            if isinstance(dev, IdeChannel | VirtioBlk):
                dev.start()
        for cpu in self._vcpus.values():
            cpu.resume()
        self._state = "running"

    def stop(self, timeout: float | None = None) -> None:
        """Pauses the vCPUs, then drains in-flight I/O of every device (their ``stop()``).

        With ``timeout``, the IDE channels and virtio-blk devices are drained first within
        that many seconds in all (the vCPUs' pause is not counted: it ends at an instruction
        boundary); when they do not drain, ``TimeoutError`` is raised with the vCPUs paused and
        the devices still started, so :meth:`start` resumes the guest as it was."""
        for cpu in self._vcpus.values():
            cpu.pause()
        if timeout is not None:
            end = time.monotonic() + timeout
            for dev in self._devices.values():
                if isinstance(dev, IdeChannel | VirtioBlk):
                    dev.drain(max(0.0, end - time.monotonic()))
        for dev in self._devices.values():
            if isinstance(dev, IdeChannel | VirtioBlk):
                dev.stop()
        if self._state == "running":
            self._state = "paused"

    # ------------------------------------------------------------------ nodes

    def iter_nodes(self) -> Iterator[tuple[str, BlockNode]]:
        """``(name, node)`` for every block node behind a device: ``"<dev>.master"`` /
        ``"<dev>.slave"`` for an IDE channel's disks, ``"<dev>"`` for a virtio-blk device."""
        for name, dev in self._devices.items():
            if isinstance(dev, IdeChannel):
                for slot in ("master", "slave"):
                    disk = getattr(dev, slot)
                    if disk is not None:
                        yield f"{name}.{slot}", disk.node
            elif isinstance(dev, VirtioBlk):
                yield name, dev.node

    @property
    def nodes(self) -> dict[str, BlockNode]:
        return dict(self.iter_nodes())

    def flush(self, timeout: float | None = None) -> None:
        """Flushes every active, writable node (raises the first error). With ``timeout`` the
        flushes run on the worker pool and ``TimeoutError`` is raised when they have not all
        finished within that many seconds (they go on in the background)."""
        nodes = [n for _, n in self.iter_nodes() if n.active and not n.readonly]
        if timeout is None:
            for node in nodes:
                node.flush()
            return
        end = time.monotonic() + timeout
        jobs = [node.flush_async() for node in nodes]
        for job in jobs:
            job.result(max(0.0, end - time.monotonic()))

    def inactivate(self) -> None:
        """Inactivates every node (flush, then release the write lock). Inactivating an
        inactive node is a no-op."""
        for _, node in self.iter_nodes():
            if node.active:
                node.inactivate()

    def activate(self) -> None:
        """Activates every node (drop caches, take the write lock). On an error the nodes this
        call activated are inactivated again, and the error is raised."""
        done: list[BlockNode] = []
        try:
            for _, node in self.iter_nodes():
                if not node.active:
                    node.activate()
                    done.append(node)
        except BaseException:
            for node in done:
                try:
                    node.inactivate()
                except Exception:
                    pass
            raise

    # ------------------------------------------------------------------ state

    def _state_devices(self) -> list[tuple[str, Device]]:
        return list(self._devices.items())

    def save_state(self) -> bytes:
        """The devices' migratable state (guest RAM included). The machine must be stopped."""
        if self._state == "running":
            raise RuntimeError("stop the machine before saving its state")
        return _core.save_state(self._state_devices())

    def load_state(self, data: bytes) -> None:
        """Installs a state from :meth:`save_state`; validates everything first, so on a
        :class:`~blockemu.StateError` nothing changed."""
        if self._state == "running":
            raise RuntimeError("a running machine cannot load a state")
        _core.load_state(self._state_devices(), data)

    def save_cpu_state(self) -> dict[str, Any]:
        return {name: cpu.save() for name, cpu in self._vcpus.items()}

    def load_cpu_state(self, state: dict[str, Any]) -> None:
        if set(state) != set(self._vcpus):
            raise StateError(
                f"vCPU state for {sorted(state)} but this machine has {sorted(self._vcpus)}"
            )
        for name, cpu in self._vcpus.items():
            try:
                cpu.load(state[name])
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise StateError(f"vCPU {name}: malformed state ({e!r})") from None

    def __repr__(self) -> str:
        return f"<Machine {self._state} devices={sorted(self._devices)}>"
