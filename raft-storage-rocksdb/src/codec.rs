//! Keys and checksummed records. Values are encoded with the workspace codec
//! (`raft_core::codec`) and sealed with a CRC32 that also covers the key.

use serde::Serialize;

use crate::legacy::Record;

pub const TAG_HARD_STATE: &[u8] = b"hs";
pub const TAG_PURGED: &[u8] = b"purged";

/// `group ++ index`, both big-endian so keys sort in log order.
pub fn log_key(group: u64, index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(&index.to_be_bytes());
    k
}

pub fn index_of(key: &[u8]) -> Option<u64> {
    let b: [u8; 8] = key.get(8..16)?.try_into().ok()?;
    (key.len() == 16).then(|| u64::from_be_bytes(b))
}

pub fn meta_key(group: u64, tag: &[u8]) -> Vec<u8> {
    let mut k = group.to_be_bytes().to_vec();
    k.extend_from_slice(tag);
    k
}

fn crc(key: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(key);
    h.update(payload);
    h.finalize()
}

/// `crc32(key ++ payload) (LE) ++ payload`.
pub fn seal_record<T: Serialize>(key: &[u8], value: &T) -> Result<Vec<u8>, String> {
    let payload = raft_core::codec::encode(value).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&crc(key, &payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Verifies and decodes a record written by [`seal_record`], by this
/// build or, for a type whose format changed, an older one
/// ([`Record::legacy`]).
pub fn open_record<T: Record>(key: &[u8], bytes: &[u8]) -> Result<T, String> {
    let (sum, payload) = bytes
        .split_at_checked(4)
        .ok_or("record shorter than its checksum")?;
    let sum = u32::from_le_bytes(sum.try_into().map_err(|_| "checksum")?);
    if sum != crc(key, payload) {
        return Err("checksum mismatch".into());
    }
    raft_core::codec::decode(payload).or_else(|e| T::legacy(payload).ok_or_else(|| e.to_string()))
}

pub fn decode_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    impl Record for (u64, String) {}

    #[test]
    fn records_detect_flips_and_moves() {
        let k = log_key(1, 7);
        let rec = seal_record(&k, &(7u64, "x".to_string())).unwrap();
        assert_eq!(
            open_record::<(u64, String)>(&k, &rec).unwrap(),
            (7, "x".into())
        );
        for bit in 0..rec.len() * 8 {
            let mut bad = rec.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                open_record::<(u64, String)>(&k, &bad).is_err(),
                "flip of bit {bit} undetected"
            );
        }
        assert!(
            open_record::<(u64, String)>(&log_key(1, 8), &rec).is_err(),
            "record under another key"
        );
        assert!(open_record::<(u64, String)>(&k, &rec[..3]).is_err());
    }

    #[test]
    fn keys_sort_in_log_order() {
        assert!(log_key(1, 255) < log_key(1, 256));
        assert!(log_key(1, u64::MAX) < log_key(2, 0));
        assert_eq!(index_of(&log_key(3, 99)), Some(99));
    }
}
