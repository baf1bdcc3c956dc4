//! Every vector of tests/data/geometry_vectors.json (a copy of shared/specs, geometry.md §12)
//! through `resolve`, plus what follows from the geometry alone: IDENTIFY words, CMOS bytes and
//! the virtio-blk config geometry.

use blockemu_core::geometry::mbr::{
    ChsAddress, PartitionEntry, BOOT_SECTOR_SIZE, PARTITION_ENTRY_SIZE, PARTITION_TABLE_OFFSET,
    SIGNATURE_OFFSET,
};
use blockemu_core::geometry::{
    resolve, DeviceKind, Geometry, GeometryConfig, Translation, TranslationRequest,
};
use blockemu_core::ErrorKind;
use serde_json::Value;

const VECTORS: &str = include_str!("data/geometry_vectors.json");

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex digits"))
        .collect()
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

fn chs(v: &Value) -> ChsAddress {
    let n = |i: usize| v[i].as_u64().expect("CHS number");
    ChsAddress {
        cylinder: n(0) as u16,
        head: n(1) as u8,
        sector: n(2) as u8,
    }
}

/// Sector 0: zeros, then the raw entries and the signature when the vector has a table.
fn boot_sector(v: &Value) -> Vec<u8> {
    let mut sector = vec![0u8; BOOT_SECTOR_SIZE];
    let Some(entries) = v["mbr"].as_array() else {
        return sector;
    };
    let raw = v["mbr_entries_hex"].as_array().expect("mbr_entries_hex");
    assert_eq!(raw.len(), entries.len());
    for (i, (entry, raw)) in entries.iter().zip(raw).enumerate() {
        let bytes = hex(raw.as_str().expect("hex string"));
        // The structured entry must pack to the raw bytes (checks ChsAddress::pack too).
        let packed = PartitionEntry {
            boot_indicator: num(entry, "boot") as u8,
            start: chs(&entry["start_chs"]),
            partition_type: num(entry, "type") as u8,
            end: chs(&entry["end_chs"]),
            start_lba: num(entry, "start_lba") as u32,
            sectors: num(entry, "nsectors") as u32,
        };
        assert_eq!(packed.to_bytes().as_slice(), bytes, "entry {i}");
        let at = PARTITION_TABLE_OFFSET + i * PARTITION_ENTRY_SIZE;
        sector[at..at + PARTITION_ENTRY_SIZE].copy_from_slice(&bytes);
    }
    let signature = hex(v["mbr_signature"].as_str().expect("mbr_signature"));
    sector[SIGNATURE_OFFSET..].copy_from_slice(&signature);
    sector
}

fn config(v: &Value) -> GeometryConfig {
    let device = DeviceKind::parse(v["device"].as_str().expect("device")).expect("known device");
    let mut config = GeometryConfig::for_device(device);
    let user = &v["user"];
    if user.is_object() {
        let field = |key: &str| user.get(key).map_or(0, |_| num(user, key) as u32);
        config.cyls = field("cyls");
        config.heads = field("heads");
        config.secs = field("secs");
        if let Some(trans) = user.get("trans") {
            config.trans = TranslationRequest::parse(trans.as_str().expect("trans")).unwrap();
        }
    }
    config
}

/// IDENTIFY words that follow from the geometry and the size (geometry.md §5.1).
fn identify_word(word: u64, g: &Geometry, total_sectors: u64) -> Option<u64> {
    let chs_sectors = g.chs_sectors() & 0xFFFF_FFFF;
    let lba28 = total_sectors.min((1 << 28) - 1);
    Some(match word {
        1 | 54 => u64::from(g.cyls) & 0xFFFF,
        3 | 55 => g.heads.into(),
        6 | 56 => g.secs.into(),
        57 => chs_sectors & 0xFFFF,
        58 => chs_sectors >> 16,
        60 => lba28 & 0xFFFF,
        61 => lba28 >> 16,
        100..=103 => (total_sectors >> (16 * (word - 100))) & 0xFFFF,
        _ => return None, // constants (53, 83): the IDE device's business
    })
}

/// The 9 CMOS bytes of an IDE unit (geometry.md §5.2).
fn cmos_drive_bytes(g: &Geometry) -> Vec<u64> {
    let (c, h, s) = (u64::from(g.cyls), u64::from(g.heads), u64::from(g.secs));
    let control = 0xC0 | (u64::from(h > 8) << 3);
    vec![
        c & 0xFF,
        c >> 8,
        h,
        0xFF,
        0xFF,
        control,
        c & 0xFF,
        c >> 8,
        s,
    ]
}

fn check(v: &Value) -> Result<(), String> {
    let total_sectors = num(v, "total_sectors");
    let config = config(v);
    let sector = boot_sector(v);
    let expect = &v["expect"];
    let result = resolve(&config, Some(&sector), total_sectors);
    if let Some(message) = expect.get("error") {
        return match result {
            Err(e) if e.kind() == ErrorKind::Geometry && e.message() == message => Ok(()),
            other => Err(format!("expected error {message}, got {other:?}")),
        };
    }
    let g = result
        .map_err(|e| format!("unexpected error {e}"))?
        .geometry;
    let want = Geometry {
        cyls: num(expect, "cyls") as u32,
        heads: num(expect, "heads") as u32,
        secs: num(expect, "secs") as u32,
        trans: Translation::parse(expect["trans"].as_str().unwrap()).unwrap(),
    };
    if g != want {
        return Err(format!("got {g:?}, want {want:?}"));
    }
    if let Some(words) = v["identify_words"].as_object() {
        for (word, value) in words {
            let word: u64 = word.parse().unwrap();
            if let Some(got) = identify_word(word, &g, total_sectors) {
                if Some(got) != value.as_u64() {
                    return Err(format!("IDENTIFY word {word}: got {got}, want {value}"));
                }
            }
        }
    }
    if let Some(code) = v["cmos_trans_code"].as_u64() {
        if u64::from(g.trans.cmos_code()) != code {
            return Err(format!("CMOS code {} != {code}", g.trans.cmos_code()));
        }
    }
    if let Some(bytes) = v["cmos_drive_bytes"].as_array() {
        let want: Vec<u64> = bytes.iter().map(|b| b.as_u64().unwrap()).collect();
        if cmos_drive_bytes(&g) != want {
            return Err(format!("CMOS bytes {:?} != {want:?}", cmos_drive_bytes(&g)));
        }
    }
    if let Some(virtio) = v.get("virtio_config_geometry").filter(|x| x.is_object()) {
        // Config space: cylinders le16, heads u8, sectors u8.
        let got = (g.cyls as u16, g.heads as u8, g.secs as u8);
        let want = (
            num(virtio, "cylinders") as u16,
            num(virtio, "heads") as u8,
            num(virtio, "sectors") as u8,
        );
        if got != want {
            return Err(format!("virtio config {got:?} != {want:?}"));
        }
    }
    Ok(())
}

#[test]
fn all_vectors_pass() {
    let vectors: Vec<Value> = serde_json::from_str(VECTORS).expect("valid JSON");
    assert_eq!(vectors.len(), 41);
    let failures: Vec<String> = vectors
        .iter()
        .filter_map(|v| check(v).err().map(|e| format!("{}: {e}", v["name"])))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
