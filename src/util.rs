//! Small file helpers shared by the root package.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// `dest` with a `.tmp` suffix and the process id, in the same directory (so the rename is
/// atomic on the same file system).
pub fn tmp_path(dest: &Path) -> PathBuf {
    let mut name = dest
        .file_name()
        .map(|s| s.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    dest.with_file_name(name)
}

/// Writes `bytes` to `dest` atomically: a temporary file, fsync, rename, fsync of the
/// directory. A crash leaves either the old file or the new one.
///
/// # Errors
/// [`Error::Io`] naming the file.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(dest);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, dest).map_err(io(dest))?;
        if let Some(parent) = dest.parent() {
            if let Ok(d) = fs::File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
