//! The one place that decides how values become bytes on the wire and on
//! disk. Every crate of the workspace encodes through here, so changing the
//! format is a change to this file.

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

/// An encode or decode failure. Decoding untrusted bytes returns this, never
/// panics.
#[derive(Debug, Error)]
pub enum CodecError {
    /// A value could not be encoded (for instance, it is over the size cap).
    #[error("encode: {0}")]
    Encode(String),
    /// The bytes are not a value of the expected type: truncated,
    /// malformed, or a length prefix over the cap.
    #[error("decode: {0}")]
    Decode(String),
    #[error("decode: {trailing} trailing bytes after the value")]
    /// The bytes held a whole value and then more.
    Trailing {
        /// How many bytes were left over.
        trailing: usize,
    },
}

fn config() -> impl bincode::config::Config {
    // Little-endian varints, with a hard cap so a hostile length prefix
    // cannot make us allocate gigabytes.
    bincode::config::standard().with_limit::<{ 256 * 1024 * 1024 }>()
}

/// Encodes `value` to a fresh buffer of exactly its size.
///
/// The value is measured first and then written once: a buffer grown by
/// doubling (bincode's `encode_to_vec`) copied a 1 MiB snapshot chunk or a
/// large append about twice over, and touched fresh pages at every step.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let failed = |e: bincode::error::EncodeError| CodecError::Encode(e.to_string());
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, config()).map_err(failed)?;
    let mut out = Exact(Vec::with_capacity(size.bytes_written));
    bincode::serde::encode_into_writer(value, &mut out, config()).map_err(failed)?;
    Ok(out.0)
}

/// A bincode writer appending to a buffer sized beforehand.
struct Exact(Vec<u8>);

impl bincode::enc::write::Writer for Exact {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Decodes one value that must span all of `bytes`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, read) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if read != bytes.len() {
        return Err(CodecError::Trailing {
            trailing: bytes.len() - read,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let v: (u64, String) = (7, "x".into());
        let bytes = encode(&v).unwrap();
        assert_eq!(bytes.capacity(), bytes.len(), "sized before it is written");
        assert_eq!(
            bytes,
            bincode::serde::encode_to_vec(&v, config()).unwrap(),
            "the same bytes as bincode's own encoder"
        );
        assert_eq!(decode::<(u64, String)>(&bytes).unwrap(), v);
        assert!(decode::<(u64, String)>(&[0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            decode::<(u64, String)>(&long),
            Err(CodecError::Trailing { trailing: 1 })
        ));
    }
}
