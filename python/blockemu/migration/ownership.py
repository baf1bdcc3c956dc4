"""The fenced-mode ownership record (specs/migration.md §12.4, "Fenced mode").

A small JSON sidecar ``<image>.owner`` beside each image: which side owns the image and at which
epoch. It is written only by the holder of the image's write lock (an active node), with
write-temp + fsync + rename + directory fsync, and always read after a fresh ``open()`` (NFS
close-to-open). Epochs only increase: the source owns epoch N, a committed destination N+1, a
source that reclaimed after a failed hand-over N+2.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["OwnerRecord", "read_record", "record_path", "write_record"]

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


def record_path(image: str | os.PathLike[str]) -> str:
    return os.fspath(image) + ".owner"


def read_record(image: str | os.PathLike[str]) -> OwnerRecord | None:
    """The record beside ``image`` (a fresh open each time), or None when there is none.
    A malformed record raises ``ValueError``."""
    path = record_path(image)
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
    """Writes the record durably: temp file, fsync, rename over, fsync the directory. The
    caller must hold the image's write lock (an active node over it)."""
    path = record_path(image)
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
