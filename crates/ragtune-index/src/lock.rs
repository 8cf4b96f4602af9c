//! A cross-process writer lock for an index directory.
//!
//! Updates of one index must not interleave: a writer that commits a manifest read before
//! another writer's commit would drop that writer's segment (and its orphan sweep would delete
//! the files). [`WriterLock`] is an advisory exclusive lock (`flock(2)` through `fs4`) on a
//! sibling file `.<name>.lock` next to the index directory, so it also covers building a new
//! index in a temporary directory and renaming it into place. Readers never take it: searches
//! only read immutable files named by an atomically replaced manifest.
//!
//! The lock file holds the holder's pid (informational, for the error message). The lock is
//! released when the [`WriterLock`] is dropped, and by the kernel when the process dies, so a
//! crashed writer never leaves the index locked.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fs4::fs_std::FileExt;

use crate::error::{Error, Result};

/// How long [`WriterLock::acquire`] waits by default for another writer to finish.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// An exclusive writer lock on one index; released on drop.
#[derive(Debug)]
pub struct WriterLock {
    file: File,
    path: PathBuf,
}

/// The lock file of the index at `index_dir`: `.<name>.lock` beside it.
pub fn lock_path(index_dir: &Path) -> PathBuf {
    let name = index_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "index".into());
    let parent = match index_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parent.join(format!(".{name}.lock"))
}

impl WriterLock {
    /// Takes the writer lock of the index at `index_dir` (which need not exist yet; its
    /// parent is created), waiting up to `timeout` while another process holds it.
    ///
    /// # Errors
    /// [`Error::Locked`] naming the holder's pid when the wait times out; [`Error::Io`].
    pub fn acquire(index_dir: &Path, timeout: Duration) -> Result<WriterLock> {
        let path = lock_path(index_dir);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let started = Instant::now();
        loop {
            if file.try_lock_exclusive().map_err(|e| Error::io(&path, e))? {
                break;
            }
            if started.elapsed() >= timeout {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let pid = holder.trim().parse::<u32>().ok();
                return Err(Error::Locked {
                    path: index_dir.to_path_buf(),
                    pid,
                    waited: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Record our pid for the next waiter's message (best effort).
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = write!(file, "{}", std::process::id());
        let _ = file.flush();
        Ok(WriterLock { file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WriterLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = FileExt::unlock(&self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_waits_then_fails_naming_the_holder() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ix = tmp.path().join("sub").join("idx");
        let held = WriterLock::acquire(&ix, Duration::from_secs(1)).expect("first");
        assert_eq!(held.path(), tmp.path().join("sub").join(".idx.lock"));
        // flock locks belong to the open file description: a second open in the same process
        // contends like another process would.
        let started = Instant::now();
        let err = WriterLock::acquire(&ix, Duration::from_millis(200)).expect_err("contended");
        assert!(started.elapsed() >= Duration::from_millis(200));
        match &err {
            Error::Locked { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
            other => panic!("unexpected {other}"),
        }
        assert!(
            err.to_string().contains(&std::process::id().to_string()),
            "{err}"
        );
        drop(held);
        WriterLock::acquire(&ix, Duration::from_millis(200)).expect("free again");
    }
}
