"""Geometry through the Python API: the spec's vectors, QEMU's error messages, CHS <-> LBA,
the Geometry class, and robustness against arbitrary sector 0 contents."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import blockemu
from blockemu import (
    Geometry,
    GeometryError,
    OutOfRangeError,
    chs_to_lba,
    explain_geometry,
    guess_geometry,
    lba_to_chs,
)
from blockemu.geometry import GeometryReport, format_report

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "data" / "geometry_vectors.json").read_text()
)


def vector_named(name: str) -> dict[str, Any]:
    return next(v for v in VECTORS if v["name"] == name)


def boot_sector(vector: dict[str, Any]) -> bytes:
    """Sector 0 of a vector: zeros, plus its raw entries and signature when it has a table."""
    sector = bytearray(512)
    if vector["mbr"] is not None:
        for i, raw in enumerate(vector["mbr_entries_hex"]):
            sector[0x1BE + 16 * i : 0x1BE + 16 * (i + 1)] = bytes.fromhex(raw)
        sector[510:512] = bytes.fromhex(vector["mbr_signature"])
    return bytes(sector)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector(vector: dict[str, Any]) -> None:
    user = vector["user"] or {}

    def call() -> Geometry:
        return guess_geometry(
            boot_sector(vector), vector["total_sectors"], device=vector["device"], **user
        )

    expect = vector["expect"]
    if "error" in expect:
        with pytest.raises(GeometryError) as info:
            call()
        assert str(info.value) == expect["error"]
        return
    got = call()
    assert got == Geometry(expect["cyls"], expect["heads"], expect["secs"], expect["trans"])
    if "identify_words" in vector:
        words = vector["identify_words"]
        assert (words["1"], words["3"], words["6"]) == (got.cyls, got.heads, got.secs)
        chs_sectors = got.cyls * got.heads * got.secs
        assert words["57"] | words["58"] << 16 == chs_sectors & 0xFFFFFFFF
    if "virtio_config_geometry" in vector:
        virtio = vector["virtio_config_geometry"]
        assert (virtio["cylinders"], virtio["heads"], virtio["sectors"]) == (
            got.cyls,
            got.heads,
            got.secs,
        )


def test_all_vectors_are_loaded() -> None:
    assert len(VECTORS) == 41


# --- user geometry: QEMU's messages, in QEMU's order ---------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cyls": 100}, "heads must be between 1 and 16"),
        ({"secs": 63}, "cyls must be between 1 and 65535"),
        ({"cyls": 100, "heads": 16}, "secs must be between 1 and 255"),
        ({"cyls": 65536, "heads": 17, "secs": 256}, "cyls must be between 1 and 65535"),
        ({"cyls": -1, "heads": 16, "secs": 63}, "cyls must be between 1 and 65535"),
        ({"cyls": 1, "heads": 2**70, "secs": 63}, "heads must be between 1 and 16"),
        ({"cyls": 1, "heads": 16, "secs": -5}, "secs must be between 1 and 255"),
        (
            {"cyls": 1, "heads": 256, "secs": 1, "device": "virtio"},
            "heads must be between 1 and 255",
        ),
        (
            {"cyls": 1, "heads": 256, "secs": 1, "device": "scsi-hd"},
            "heads must be between 1 and 255",
        ),
        (
            {"cyls": 1, "heads": 1, "secs": 256, "device": "virtio-blk"},
            "secs must be between 1 and 255",
        ),
    ],
)
def test_user_geometry_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(GeometryError, match=f"^{message}$"):
        guess_geometry(None, 61440, **kwargs)


def test_geometry_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="heads"):
        guess_geometry(None, 1, cyls=1, heads=17, secs=1)


def test_user_geometry_ignores_the_boot_sector() -> None:
    # A 4-head MBR would give 480/4/32; the user's values win, auto gives lba for S > 63.
    mbr = boot_sector(vector_named("derived/mbr/h4_s32"))
    assert guess_geometry(mbr, 61440, cyls=10, heads=16, secs=64) == Geometry(10, 16, 64, "lba")
    assert guess_geometry(mbr, 61440) == Geometry(480, 4, 32, "none")


def test_translation_request() -> None:
    assert guess_geometry(None, 61440, trans="rechs").trans == "rechs"
    assert guess_geometry(None, 61440, trans="rechs", device="virtio").trans == "none"
    assert guess_geometry(None, 61440, cyls=60, heads=16, secs=63, trans="large").trans == "large"


@pytest.mark.parametrize(
    "kwargs", [{"trans": "echs"}, {"trans": "AUTO"}, {"device": "floppy"}, {"device": ""}]
)
def test_bad_strings_are_value_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as info:
        guess_geometry(None, 1, **kwargs)
    assert not isinstance(info.value, GeometryError)


@pytest.mark.parametrize("total", [-1, 2**64])
def test_bad_total_sectors(total: int) -> None:
    with pytest.raises(ValueError, match="total_sectors"):
        guess_geometry(None, total)


def test_boot_sector_types() -> None:
    mbr = boot_sector(vector_named("derived/mbr/h16_s32"))
    want = Geometry(120, 16, 32, "none")
    assert guess_geometry(bytearray(mbr), 61440) == want
    assert guess_geometry(memoryview(mbr), 61440) == want
    # Only the first 512 bytes count; fewer than 512 means no MBR.
    assert guess_geometry(mbr + b"\xff" * 512, 61440) == want
    assert guess_geometry(mbr[:511], 61440) == Geometry(60, 16, 63, "none")
    with pytest.raises(TypeError):
        guess_geometry("not bytes", 61440)  # type: ignore[arg-type]


# --- CHS <-> LBA ---------------------------------------------------------------------------

DISK_4G = Geometry(8322, 16, 63, "lba")


@pytest.mark.parametrize(
    ("lba", "chs"),
    [
        (0, (0, 0, 1)),
        (62, (0, 0, 63)),
        (63, (0, 1, 1)),
        (1007, (0, 15, 63)),
        (1008, (1, 0, 1)),
        (8388575, (8321, 15, 63)),
    ],
)
def test_spec_examples(lba: int, chs: tuple[int, int, int]) -> None:
    assert lba_to_chs(DISK_4G, lba) == chs
    assert chs_to_lba(DISK_4G, *chs) == lba


@pytest.mark.parametrize(
    "chs", [(8322, 0, 1), (0, 16, 1), (0, 0, 0), (0, 0, 64), (2**64, 0, 1), (0, 0, 2**100)]
)
def test_chs_out_of_range(chs: tuple[int, int, int]) -> None:
    with pytest.raises(OutOfRangeError):
        chs_to_lba(DISK_4G, *chs)


@pytest.mark.parametrize("lba", [8388576, 2**64 - 1, 2**64, 2**200])
def test_lba_out_of_range(lba: int) -> None:
    with pytest.raises(OutOfRangeError):
        lba_to_chs(DISK_4G, lba)


def test_negative_addresses_are_value_errors() -> None:
    for chs in [(-1, 0, 1), (0, -1, 1), (0, 0, -1)]:
        with pytest.raises(ValueError, match="negative") as info:
            chs_to_lba(DISK_4G, *chs)
        assert not isinstance(info.value, OutOfRangeError)
    with pytest.raises(ValueError, match="negative"):
        lba_to_chs(DISK_4G, -1)


geometries = st.builds(
    Geometry,
    st.integers(1, 65535),
    st.integers(1, 255),
    st.integers(1, 255),
    st.sampled_from(["none", "lba", "large", "rechs"]),
)


@given(geometries, st.integers(0, 2**64 - 1))
def test_lba_round_trip(geometry: Geometry, seed: int) -> None:
    lba = seed % (geometry.cyls * geometry.heads * geometry.secs)
    c, h, s = lba_to_chs(geometry, lba)
    assert 0 <= c < geometry.cyls and 0 <= h < geometry.heads and 1 <= s <= geometry.secs
    assert chs_to_lba(geometry, c, h, s) == lba


@given(geometries, st.data())
def test_chs_round_trip(geometry: Geometry, data: st.DataObject) -> None:
    c = data.draw(st.integers(0, geometry.cyls - 1))
    h = data.draw(st.integers(0, geometry.heads - 1))
    s = data.draw(st.integers(1, geometry.secs))
    assert lba_to_chs(geometry, chs_to_lba(geometry, c, h, s)) == (c, h, s)


# --- arbitrary sector 0 --------------------------------------------------------------------


def signed(sector: bytes) -> bytes:
    return sector[:510] + b"\x55\xaa"


sectors = st.one_of(
    st.none(),
    st.binary(max_size=600),
    st.binary(min_size=512, max_size=512).map(signed),
)
sizes = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2015, 16514064, 2**64 - 1]))


@given(sectors, sizes, st.sampled_from(["ide", "virtio", "scsi-hd"]))
def test_guess_never_fails_and_stays_in_range(
    sector: bytes | None, total: int, device: str
) -> None:
    g = guess_geometry(sector, total, device=device)
    assert 1 <= g.cyls <= 16383 and 1 <= g.heads <= 16 and 1 <= g.secs <= 63
    if device != "ide":
        assert g.trans == "none"
    report = explain_geometry(sector, total, device=device)
    assert report["geometry"] == {
        "cyls": g.cyls,
        "heads": g.heads,
        "secs": g.secs,
        "trans": g.trans,
    }
    assert len(report["partitions"]) in (0, 4)
    json.dumps(report)
    assert format_report(report)


@given(sectors, sizes, st.integers(-(2**70), 2**70), st.integers(-300, 300), st.integers(-300, 300))
def test_user_values_raise_only_geometry_errors(
    sector: bytes | None, total: int, cyls: int, heads: int, secs: int
) -> None:
    try:
        g = guess_geometry(sector, total, cyls=cyls, heads=heads, secs=secs)
    except GeometryError:
        assert not (1 <= cyls <= 65535 and 1 <= heads <= 16 and 1 <= secs <= 255)
        return
    if (cyls, heads, secs) != (0, 0, 0):
        assert (g.cyls, g.heads, g.secs) == (cyls, heads, secs)


# --- explain_geometry and the report ---------------------------------------------------------


def test_explain_mbr_with_many_heads() -> None:
    vector = vector_named("derived/mbr255/2GiB_large")
    report: GeometryReport = explain_geometry(boot_sector(vector), vector["total_sectors"])
    assert set(report) == set(GeometryReport.__annotations__)
    assert report["geometry"] == {"cyls": 4161, "heads": 16, "secs": 63, "trans": "large"}
    assert report["source"] == "mbr-many-heads"
    assert report["entry"] == 0
    assert report["translation_source"] == "auto"
    assert report["signature"] == "55aa"
    first = report["partitions"][0]
    assert first == {
        "index": 0,
        "bootable": True,
        "type": 0x83,
        "start_chs": (0, 1, 1),
        "end_chs": (260, 254, 63),
        "start_lba": 63,
        "sectors": 4192902,
    }
    text = format_report(report)
    assert "4161 cylinders, 16 heads, 63 sectors per track" in text
    assert "large (resolved from auto)" in text
    assert "<- decided the geometry" in text


@pytest.mark.parametrize(
    ("sector", "source", "signature"),
    [
        (None, "no-boot-sector", None),
        (b"\x00" * 100, "no-boot-sector", None),
        (b"\x00" * 510 + b"\xaa\x55", "no-signature", "aa55"),
        (b"\x00" * 510 + b"\x55\xaa", "no-acceptable-entry", "55aa"),
    ],
)
def test_explain_default_reasons(sector: bytes | None, source: str, signature: str | None) -> None:
    report = explain_geometry(sector, 8388608)
    assert report["source"] == source
    assert report["signature"] == signature
    assert report["entry"] is None
    assert report["reason"].endswith("size-based default")
    assert report["geometry"] == {"cyls": 8322, "heads": 16, "secs": 63, "trans": "lba"}


def test_explain_user_geometry() -> None:
    report = explain_geometry(None, 61440, cyls=100, heads=16, secs=63, trans="none")
    assert (report["source"], report["translation_source"]) == ("user", "user")
    virtio = explain_geometry(None, 61440, device="virtio")
    assert (virtio["device"], virtio["translation_source"]) == ("virtio-blk", "no-slot")


# --- the Geometry class ----------------------------------------------------------------------


def test_geometry_value_semantics() -> None:
    g = Geometry(8322, 16, 63, "lba")
    assert (g.cyls, g.heads, g.secs, g.trans) == (8322, 16, 63, "lba")
    assert repr(g) == "Geometry(cyls=8322, heads=16, secs=63, trans='lba')"
    assert g == Geometry(8322, 16, 63, "lba") and g == g
    assert g != Geometry(8322, 16, 63) and g != (8322, 16, 63, "lba")
    assert hash(g) == hash(Geometry(8322, 16, 63, "lba"))
    assert len({g, Geometry(8322, 16, 63, "lba"), Geometry(8322, 16, 63)}) == 2
    assert Geometry(1, 16, 63, "rechs") < Geometry(2, 1, 1) <= Geometry(2, 1, 1)
    assert Geometry(2, 1, 1, "none") < Geometry(2, 1, 1, "lba")
    assert Geometry(5, 5, 5).trans == "none"
    assert pickle.loads(pickle.dumps(g)) == g
    assert copy.deepcopy(g) == g
    assert type(g).__module__ == "blockemu" and blockemu.Geometry is Geometry


def test_geometry_is_immutable() -> None:
    g = Geometry(1, 1, 1)
    for name in ("cyls", "heads", "secs", "trans"):
        with pytest.raises(AttributeError):
            setattr(g, name, 2)
    with pytest.raises(AttributeError):
        g.extra = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0, 16, 63), GeometryError, "cyls must be between 1 and 65535"),
        ((1, 256, 63), GeometryError, "heads must be between 1 and 255"),
        ((1, 16, -1), GeometryError, "secs must be between 1 and 255"),
        ((1, 16, 63, "auto"), ValueError, "unknown translation 'auto'"),
        ((1, 16, 63, "LBA"), ValueError, "unknown translation"),
    ],
)
def test_geometry_validation(args: tuple[Any, ...], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Geometry(*args)
