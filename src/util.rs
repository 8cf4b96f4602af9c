//! Small helpers shared by the root package: [`ragtune_util::fs`]'s atomic write, with its
//! errors mapped to [`Error::Io`] naming the file, and lowercase hex for digests.

use std::path::Path;

use crate::{Error, Result};

pub use ragtune_util::fs::tmp_path;

/// Writes `bytes` to `dest` atomically: a temporary file, fsync, rename, fsync of the
/// directory. A crash leaves either the old file or the new one.
///
/// # Errors
/// [`Error::Io`] naming the file.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    ragtune_util::fs::write_atomic(dest, bytes).map_err(|source| Error::Io {
        path: dest.to_path_buf(),
        source,
    })
}

/// `bytes` as lowercase hex, two digits a byte (how sha256 digests are written).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
