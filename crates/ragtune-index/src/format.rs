//! Binary file header, checked casts, and the checksummed JSON manifest.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::{EmbedderId, HnswParams};

/// Version of every file format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed header at the start of every binary file; payloads start here (64-aligned).
pub const HEADER_LEN: usize = 64;

/// Magic of the vectors file.
pub const MAGIC_VECTORS: [u8; 8] = *b"RTVEC\0\0\0";
/// Magic of the graph file.
pub const MAGIC_GRAPH: [u8; 8] = *b"RTGRAPH\0";
/// Magic of the chunk-store file.
pub const MAGIC_CHUNKS: [u8; 8] = *b"RTCHUNK\0";
/// Magic of the lexical (BM25 postings) file.
pub const MAGIC_LEXICAL: [u8; 8] = *b"RTLEX\0\0\0";

/// The fixed 64-byte header of a binary file (all integers little-endian).
///
/// | bytes  | field |
/// |--------|-------|
/// | 0..8   | magic |
/// | 8..12  | format version (u32) |
/// | 12..16 | reserved, zero |
/// | 16..24 | payload length in bytes (u64) |
/// | 24..28 | crc32 of the payload (u32) |
/// | 28..32 | reserved, zero |
/// | 32..40 | `aux0` (u64, meaning per file: rows) |
/// | 40..48 | `aux1` (u64, meaning per file: dim / M) |
/// | 48..60 | reserved, zero |
/// | 60..64 | crc32 of bytes 0..60 (u32) |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// File kind.
    pub magic: [u8; 8],
    /// Format version.
    pub version: u32,
    /// Payload length in bytes.
    pub payload_len: u64,
    /// crc32 of the payload.
    pub payload_crc: u32,
    /// First per-kind field.
    pub aux0: u64,
    /// Second per-kind field.
    pub aux1: u64,
}

impl Header {
    /// Encodes to 64 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.magic);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[16..24].copy_from_slice(&self.payload_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.payload_crc.to_le_bytes());
        b[32..40].copy_from_slice(&self.aux0.to_le_bytes());
        b[40..48].copy_from_slice(&self.aux1.to_le_bytes());
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks the header only (magic, header crc, version, reserved bytes).
    ///
    /// # Errors
    /// [`Error::DataCorruption`] naming `path`, or [`Error::UnsupportedVersion`].
    pub fn decode(bytes: &[u8], magic: [u8; 8], path: &Path) -> Result<Header> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::corrupt(
                path,
                format!(
                    "file is {} bytes, shorter than its {HEADER_LEN}-byte header",
                    bytes.len()
                ),
            ));
        }
        let b = &bytes[..HEADER_LEN];
        if b[0..8] != magic {
            return Err(Error::corrupt(
                path,
                "bad magic bytes (not this kind of index file)",
            ));
        }
        let stored = read_u32(b, 60);
        if crc32fast::hash(&b[0..60]) != stored {
            return Err(Error::corrupt(path, "header checksum mismatch"));
        }
        let version = read_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if b[12..16]
            .iter()
            .chain(&b[28..32])
            .chain(&b[48..60])
            .any(|&x| x != 0)
        {
            return Err(Error::corrupt(path, "reserved header bytes are not zero"));
        }
        Ok(Header {
            magic,
            version,
            payload_len: read_u64(b, 16),
            payload_crc: read_u32(b, 24),
            aux0: read_u64(b, 32),
            aux1: read_u64(b, 40),
        })
    }
}

/// Builds a whole file: header + payload.
pub fn write_file(magic: [u8; 8], aux0: u64, aux1: u64, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        magic,
        version: FORMAT_VERSION,
        payload_len: payload.len() as u64,
        payload_crc: crc32fast::hash(payload),
        aux0,
        aux1,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(payload);
    out
}

/// Checks header, length and payload checksum of a whole file; returns the header.
///
/// # Errors
/// [`Error::DataCorruption`] naming `path`, or [`Error::UnsupportedVersion`].
pub fn verify_file(bytes: &[u8], magic: [u8; 8], path: &Path) -> Result<Header> {
    let h = Header::decode(bytes, magic, path)?;
    let actual = (bytes.len() - HEADER_LEN) as u64;
    if h.payload_len != actual {
        return Err(Error::corrupt(
            path,
            format!(
                "payload is {actual} bytes but the header says {} (truncated or extended file)",
                h.payload_len
            ),
        ));
    }
    if crc32fast::hash(&bytes[HEADER_LEN..]) != h.payload_crc {
        return Err(Error::corrupt(path, "payload checksum mismatch"));
    }
    Ok(h)
}

#[inline]
pub(crate) fn read_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

#[inline]
pub(crate) fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(target_endian = "big")]
compile_error!(
    "ragtune-index reinterprets little-endian files in place and needs a little-endian target"
);

/// Plain-old-data element types that may be viewed in place from file bytes.
pub(crate) trait Pod: Copy {}
impl Pod for u32 {}
impl Pod for u64 {}
impl Pod for f32 {}

/// Views `bytes` as a slice of `T`, checking length and alignment (never UB).
///
/// # Errors
/// [`Error::DataCorruption`] naming `path` when the length is not a multiple of the element
/// size or the start is misaligned.
pub(crate) fn cast_slice<'a, T: Pod>(bytes: &'a [u8], path: &Path, what: &str) -> Result<&'a [T]> {
    let size = std::mem::size_of::<T>();
    if bytes.len() % size != 0 {
        return Err(Error::corrupt(
            path,
            format!("{what}: length {} is not a multiple of {size}", bytes.len()),
        ));
    }
    if (bytes.as_ptr() as usize) % std::mem::align_of::<T>() != 0 {
        return Err(Error::corrupt(
            path,
            format!("{what}: data is not aligned for in-place reading"),
        ));
    }
    // SAFETY: the pointer is aligned for `T` (checked above), the length is an exact multiple
    // of `size_of::<T>()`, the bytes are initialised and borrowed for 'a, and `T` is a
    // plain-old-data type (u32/u64/f32) for which every bit pattern is valid. The target is
    // little-endian (compile-time check), matching the file encoding.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

// ---------------------------------------------------------------------------------------------
// Manifest

/// Name of the manifest file.
pub const MANIFEST: &str = "manifest.json";
const TRAILER_PREFIX: &str = "\ncrc32 ";

/// One file of a segment as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside the index directory.
    pub name: String,
    /// Total length in bytes (header included).
    pub len: u64,
    /// crc32 of the payload (same as in the header).
    pub crc32: u32,
}

/// One immutable segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    /// Segment number (unique in the directory's history).
    pub seg: u64,
    /// Number of rows (chunks) stored, tombstoned ones included.
    pub rows: u64,
    /// The vectors file.
    pub vectors: FileEntry,
    /// The graph file.
    pub graph: FileEntry,
    /// The chunk-store file.
    pub chunks: FileEntry,
    /// The lexical postings file (`aux1` of its header = term count). Absent in indexes
    /// written before lexical search existed; `Index::add_lexical` adds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lexical: Option<FileEntry>,
}

/// The manifest: the single source of truth naming the live files of an index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub format_version: u32,
    /// Bumped on every committed change.
    pub generation: u64,
    /// Which model made the vectors.
    pub embedder: EmbedderId,
    /// Similarity metric.
    pub metric: crate::Metric,
    /// Graph parameters.
    pub params: HnswParams,
    /// Vector dimension.
    pub dim: u32,
    /// Next chunk id to hand out.
    pub next_id: u64,
    /// Next segment number to use.
    pub next_segment: u64,
    /// Live chunk count (rows minus tombstones).
    pub live_chunks: u64,
    /// Segments, in id order.
    pub segments: Vec<SegmentEntry>,
    /// Deleted chunk ids, sorted.
    pub tombstones: Vec<u64>,
    /// Free-form notes (not interpreted).
    #[serde(default)]
    pub notes: BTreeMap<String, String>,
}

impl Manifest {
    /// Serialises: pretty JSON body, then a trailer line `crc32 xxxxxxxx` over the body.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let body = serde_json::to_string_pretty(self)
            .map_err(|source| Error::ManifestEncode { source })?;
        let crc = crc32fast::hash(body.as_bytes());
        Ok(format!("{body}{TRAILER_PREFIX}{crc:08x}\n").into_bytes())
    }

    /// Parses and verifies a manifest file.
    ///
    /// # Errors
    /// [`Error::DataCorruption`] naming `path`, or [`Error::UnsupportedVersion`].
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Manifest> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| Error::corrupt(path, "manifest is not valid UTF-8"))?;
        let Some(pos) = text.rfind(TRAILER_PREFIX) else {
            return Err(Error::corrupt(
                path,
                "manifest checksum trailer missing (truncated file?)",
            ));
        };
        let body = &text[..pos];
        let trailer = &text[pos + TRAILER_PREFIX.len()..];
        let hex = trailer.strip_suffix('\n').unwrap_or("");
        if hex.len() != 8
            || !hex
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        {
            return Err(Error::corrupt(
                path,
                "manifest checksum trailer is malformed",
            ));
        }
        let stored = u32::from_str_radix(hex, 16)
            .map_err(|_| Error::corrupt(path, "manifest checksum trailer is malformed"))?;
        if crc32fast::hash(body.as_bytes()) != stored {
            return Err(Error::corrupt(path, "manifest checksum mismatch"));
        }
        let value: serde_json::Value = serde_json::from_str(body)
            .map_err(|e| Error::corrupt(path, format!("manifest is not valid JSON: {e}")))?;
        let version = value
            .get("format_version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| Error::corrupt(path, "manifest has no format_version"))?;
        if version != u64::from(FORMAT_VERSION) {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                found: u32::try_from(version).unwrap_or(u32::MAX),
                supported: FORMAT_VERSION,
            });
        }
        serde_json::from_value(value)
            .map_err(|e| Error::corrupt(path, format!("manifest fields are invalid: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn header_roundtrip(v0 in any::<u64>(), v1 in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let file = write_file(MAGIC_GRAPH, v0, v1, &payload);
            let bytes = crate::directory::FileBytes::from_slice(&file);
            let h = verify_file(&bytes, MAGIC_GRAPH, Path::new("x")).expect("verify");
            prop_assert_eq!(h.aux0, v0);
            prop_assert_eq!(h.aux1, v1);
            prop_assert_eq!(h.payload_len, payload.len() as u64);
            prop_assert_eq!(&bytes[HEADER_LEN..], &payload[..]);
            prop_assert_eq!(Header::decode(&h.encode(), MAGIC_GRAPH, Path::new("x")).expect("decode"), h);
        }

        #[test]
        fn header_flip_detected(pos in 0usize..64, bit in 0u8..8) {
            let mut file = write_file(MAGIC_VECTORS, 5, 7, b"abc");
            file[pos] ^= 1 << bit;
            prop_assert!(verify_file(&file, MAGIC_VECTORS, Path::new("x")).is_err());
        }
    }
}
