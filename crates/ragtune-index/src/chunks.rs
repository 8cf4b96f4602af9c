//! The chunk store: an offset-indexed table of encoded [`ChunkRecord`]s, read lazily.
//!
//! Payload layout (after the 64-byte header; all integers little-endian):
//!
//! ```text
//! u64 count
//! u64 ids[count]            stable chunk ids, strictly ascending
//! u64 offsets[count + 1]    record i is records[offsets[i]..offsets[i+1]]
//! u8  records[..]
//! ```
//!
//! A record: `str doc_id, u32 chunk, u64 start, u64 end, str text, u32 n_meta, n_meta x (str key,
//! str value)`, where `str` is a u32 byte length followed by UTF-8 bytes. Metadata keys are
//! written in sorted order (they come from a `BTreeMap`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::directory::FileBytes;
use crate::error::{Error, Result};
use crate::format::{cast_slice, read_u32, read_u64, HEADER_LEN};
use crate::ChunkRecord;

/// Appends the encoding of one record to `out`.
///
/// # Errors
/// [`Error::TooLarge`] if a string is longer than `u32::MAX` bytes.
pub fn encode_record(r: &ChunkRecord, out: &mut Vec<u8>) -> Result<()> {
    put_str(out, &r.doc_id)?;
    out.extend_from_slice(&r.chunk.to_le_bytes());
    out.extend_from_slice(&r.start.to_le_bytes());
    out.extend_from_slice(&r.end.to_le_bytes());
    put_str(out, &r.text)?;
    let n = u32::try_from(r.metadata.len()).map_err(|_| Error::TooLarge {
        what: "metadata entries in a chunk record",
        limit: u64::from(u32::MAX),
        got: r.metadata.len() as u64,
    })?;
    out.extend_from_slice(&n.to_le_bytes());
    for (k, v) in &r.metadata {
        put_str(out, k)?;
        put_str(out, v)?;
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<()> {
    let n = u32::try_from(s.len()).map_err(|_| Error::TooLarge {
        what: "bytes in one string of a chunk record",
        limit: u64::from(u32::MAX),
        got: s.len() as u64,
    })?;
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// A record borrowed from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// Document id.
    pub doc_id: &'a str,
    /// Chunk number within the document.
    pub chunk: u32,
    /// Byte offset of the chunk start in the source document.
    pub start: u64,
    /// Byte offset of the chunk end in the source document.
    pub end: u64,
    /// Chunk text.
    pub text: &'a str,
    /// Metadata pairs, sorted by key.
    pub metadata: Vec<(&'a str, &'a str)>,
}

impl RecordRef<'_> {
    /// Copies into an owned record.
    pub fn to_owned_record(&self) -> ChunkRecord {
        ChunkRecord {
            doc_id: self.doc_id.to_string(),
            chunk: self.chunk,
            start: self.start,
            end: self.end,
            text: self.text.to_string(),
            metadata: self
                .metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| read_u32(s, 0))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|s| read_u64(s, 0))
    }
    fn str(&mut self) -> Option<std::result::Result<&'a str, ()>> {
        let n = self.u32()? as usize;
        let s = self.take(n)?;
        Some(std::str::from_utf8(s).map_err(|_| ()))
    }
}

/// Decodes one record; `None` on any malformation (truncated, bad UTF-8, trailing bytes).
pub fn decode_record(b: &[u8]) -> Option<RecordRef<'_>> {
    let mut r = Reader { b, at: 0 };
    let doc_id = r.str()?.ok()?;
    let chunk = r.u32()?;
    let start = r.u64()?;
    let end = r.u64()?;
    let text = r.str()?.ok()?;
    let n = r.u32()? as usize;
    let mut metadata = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let k = r.str()?.ok()?;
        let v = r.str()?.ok()?;
        metadata.push((k, v));
    }
    if r.at != b.len() {
        return None;
    }
    Some(RecordRef {
        doc_id,
        chunk,
        start,
        end,
        text,
        metadata,
    })
}

/// Encodes a whole chunk-store payload. `ids` must be strictly ascending.
///
/// # Errors
/// [`Error::TooLarge`] on oversized strings, [`Error::RecordCountMismatch`] when `records`
/// does not yield one record per id.
pub fn encode_store<'r>(
    ids: &[u64],
    records: impl Iterator<Item = &'r ChunkRecord>,
) -> Result<Vec<u8>> {
    let count = ids.len();
    let mut recs = Vec::new();
    let mut offsets = Vec::with_capacity(count + 1);
    offsets.push(0u64);
    for r in records {
        encode_record(r, &mut recs)?;
        offsets.push(recs.len() as u64);
    }
    if offsets.len() != count + 1 {
        return Err(Error::RecordCountMismatch {
            ids: count,
            records: offsets.len() - 1,
        });
    }
    let mut out = Vec::with_capacity(8 + 16 * count + 8 + recs.len());
    out.extend_from_slice(&(count as u64).to_le_bytes());
    for id in ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
    for o in &offsets {
        out.extend_from_slice(&o.to_le_bytes());
    }
    out.extend_from_slice(&recs);
    Ok(out)
}

/// A chunk store opened in place over its file bytes.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    bytes: FileBytes,
    path: PathBuf,
    count: usize,
    ids_at: usize,
    offsets_at: usize,
    records_at: usize,
}

impl ChunkStore {
    /// Opens a verified file (header already checked); validates the tables.
    ///
    /// # Errors
    /// [`Error::DataCorruption`] naming `path`.
    pub fn open(bytes: FileBytes, path: &Path, expected_rows: u64) -> Result<ChunkStore> {
        let payload = &bytes[HEADER_LEN..];
        if payload.len() < 8 {
            return Err(Error::corrupt(path, "chunk store too short"));
        }
        let count64 = read_u64(payload, 0);
        if count64 != expected_rows {
            return Err(Error::corrupt(
                path,
                format!("chunk store holds {count64} rows, manifest says {expected_rows}"),
            ));
        }
        let count =
            usize::try_from(count64).map_err(|_| Error::corrupt(path, "row count too large"))?;
        let tables = count
            .checked_mul(16)
            .and_then(|x| x.checked_add(16))
            .ok_or_else(|| Error::corrupt(path, "row count too large"))?;
        if payload.len() < tables {
            return Err(Error::corrupt(path, "chunk store tables truncated"));
        }
        let ids_at = HEADER_LEN + 8;
        let offsets_at = ids_at + 8 * count;
        let records_at = offsets_at + 8 * (count + 1);
        let store = ChunkStore {
            bytes,
            path: path.to_path_buf(),
            count,
            ids_at,
            offsets_at,
            records_at,
        };
        // Validate tables: ids ascending, offsets monotone and in range.
        let ids = store.ids()?;
        if ids.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::corrupt(path, "chunk ids are not strictly ascending"));
        }
        let offs = store.offsets()?;
        let rec_len = (store.bytes.len() - records_at) as u64;
        if offs.first() != Some(&0)
            || offs.windows(2).any(|w| w[0] > w[1])
            || offs.last() != Some(&rec_len)
        {
            return Err(Error::corrupt(path, "chunk offset table is inconsistent"));
        }
        Ok(store)
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Stable ids of the rows, ascending.
    pub fn ids(&self) -> Result<&[u64]> {
        cast_slice(
            &self.bytes[self.ids_at..self.offsets_at],
            &self.path,
            "chunk ids",
        )
    }

    fn offsets(&self) -> Result<&[u64]> {
        cast_slice(
            &self.bytes[self.offsets_at..self.records_at],
            &self.path,
            "chunk offsets",
        )
    }

    /// The record at `row`.
    ///
    /// # Errors
    /// [`Error::DataCorruption`] if the record cannot be decoded; [`Error::RowOutOfRange`]
    /// if `row` is out of range.
    pub fn get(&self, row: usize) -> Result<RecordRef<'_>> {
        if row >= self.count {
            return Err(Error::RowOutOfRange {
                row,
                count: self.count,
            });
        }
        if !self.bytes.still_intact() {
            return Err(Error::corrupt(
                &self.path,
                "the file was truncated while the index was open (index files must never be \
                 edited in place)",
            ));
        }
        let offs = self.offsets()?;
        // Offsets were validated monotone and in range on open.
        let a = self.records_at + offs[row] as usize;
        let b = self.records_at + offs[row + 1] as usize;
        decode_record(&self.bytes[a..b])
            .ok_or_else(|| Error::corrupt(&self.path, format!("chunk record {row} is malformed")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_record() -> impl Strategy<Value = ChunkRecord> {
        (
            ".*",
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            "\\PC*",
            proptest::collection::btree_map(".*", "\\PC*", 0..5),
        )
            .prop_map(|(doc_id, chunk, start, end, text, metadata)| ChunkRecord {
                doc_id,
                chunk,
                start,
                end,
                text,
                metadata,
            })
    }

    proptest! {
        #[test]
        fn record_roundtrip(r in arb_record()) {
            let mut buf = Vec::new();
            encode_record(&r, &mut buf).expect("encode");
            let back = decode_record(&buf).expect("decode").to_owned_record();
            prop_assert_eq!(back, r);
            // any strict prefix fails to decode
            if !buf.is_empty() {
                prop_assert!(decode_record(&buf[..buf.len() - 1]).is_none());
            }
        }

        #[test]
        fn store_roundtrip(rs in proptest::collection::vec(arb_record(), 0..8)) {
            let ids: Vec<u64> = (0..rs.len() as u64).map(|i| i * 3 + (u64::MAX / 2)).collect();
            let payload = encode_store(&ids, rs.iter()).expect("encode");
            let file = crate::format::write_file(crate::format::MAGIC_CHUNKS, rs.len() as u64, 0, &payload);
            let store = ChunkStore::open(FileBytes::from_slice(&file), Path::new("c"), rs.len() as u64).expect("open");
            prop_assert_eq!(store.ids().expect("ids"), &ids[..]);
            for (i, r) in rs.iter().enumerate() {
                prop_assert_eq!(&store.get(i).expect("get").to_owned_record(), r);
            }
        }
    }
}
