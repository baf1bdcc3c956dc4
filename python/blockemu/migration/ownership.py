"""The fenced-mode ownership record (specs/migration.md §12.4, "Fenced mode").

A small JSON sidecar, by default ``<image>.owner`` beside each image file: which side owns the
image and at which epoch. An NBD image has no file here (and an NBD client holds no lock): its
record is kept at a path the caller gives (``records=`` of :func:`~blockemu.migration.migrate`
and :func:`~blockemu.migration.incoming`), or there is none (simple mode). It is written only by
the holder of the image's write lock (an active node; for NBD the coordinator's single writer),
with write-temp + fsync + rename + directory fsync, and always read after a fresh ``open()`` (NFS
close-to-open). Epochs only increase: the source owns epoch N, a committed destination N+1, a
source that reclaimed after a failed hand-over N+2.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "OwnerRecord",
    "Records",
    "is_lockless",
    "read_record",
    "read_record_at",
    "record_path",
    "resolve_records",
    "write_record",
    "write_record_at",
]

NBD_SCHEMES = ("nbd://", "nbd+unix://", "nbd+tcp://")

MAX_RECORD = 4096


@dataclass(frozen=True)
class OwnerRecord:
    vm: str  # the VM's identity (same on both sides)
    owner: str  # the owning side's instance id (unique per process and role)
    role: str  # "source" or "destination" (informational)
    epoch: int
    session: str = ""
    time: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def is_lockless(image: str) -> bool:
    """Whether ``image`` (a node's name) is an NBD URI: no image file here, no file lock; only
    the coordinator keeps a single writer."""
    return image.startswith(NBD_SCHEMES)


def record_path(image: str | os.PathLike[str]) -> str:
    return os.fspath(image) + ".owner"


def read_record(image: str | os.PathLike[str]) -> OwnerRecord | None:
    """The record beside ``image`` (a fresh open each time), or None when there is none.
    A malformed record raises ``ValueError``."""
    return read_record_at(record_path(image))


def read_record_at(path: str | os.PathLike[str]) -> OwnerRecord | None:
    """The record at ``path`` itself (a fresh open each time), or None when there is none.
    A malformed record raises ``ValueError``."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, MAX_RECORD + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_RECORD:
        raise ValueError(f"{path}: ownership record too large")
    obj = json.loads(data.decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a JSON object")
    try:
        rec = OwnerRecord(
            vm=str(obj["vm"]),
            owner=str(obj["owner"]),
            role=str(obj["role"]),
            epoch=int(obj["epoch"]),
            session=str(obj.get("session", "")),
            time=float(obj.get("time", 0.0)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed ownership record ({e})") from None
    return rec


def write_record(image: str | os.PathLike[str], record: OwnerRecord) -> None:
    """Writes the record beside ``image`` durably: temp file, fsync, rename over, fsync the
    directory. The caller must hold the image's write lock (an active node over it)."""
    write_record_at(record_path(image), record)


def write_record_at(path: str | os.PathLike[str], record: OwnerRecord) -> None:
    """Writes the record at ``path`` itself (see :func:`write_record`)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    rec = record if record.time else OwnerRecord(**{**asdict(record), "time": time.time()})
    data = json.dumps(rec.to_json(), sort_keys=True).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


#: ``records=``: node name → ownership record path.
Records = Mapping[str, str | os.PathLike[str]]


def resolve_records(images: Mapping[str, str], records: Records | None) -> dict[str, str | None]:
    """Where each node's ownership record is: ``records[node]`` when the caller gave one (keys
    are the machine's node names, ``"vblk0"``, ``"ide0.master"``), else ``<image>.owner`` beside
    an image file; None for an NBD image without one (simple mode). ``images`` maps node names
    to the nodes' image names. An unknown key in ``records`` is a ``ValueError``."""
    given = dict(records or {})
    unknown = sorted(set(given) - set(images))
    if unknown:
        raise ValueError(f"records= names unknown nodes {unknown} (nodes: {sorted(images)})")
    out: dict[str, str | None] = {}
    for name, image in images.items():
        if name in given:
            out[name] = os.fspath(given[name])
        elif is_lockless(image):
            out[name] = None
        else:
            out[name] = record_path(image)
    return out
