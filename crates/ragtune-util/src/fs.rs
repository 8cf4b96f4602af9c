//! Atomic file replacement: a file is written to a temporary name in its own directory,
//! fsynced, renamed over the destination and the directory fsynced, so that a crash leaves
//! either the old file or the new one, never a torn one.
//!
//! Temporary names are `NAME.<pid>-<n>.tmp` ([`tmp_name`]): the writer's process id and a
//! per-process counter, so that concurrent writers (processes or threads) never share one, and
//! a sweep can tell the leftovers of a crashed process by its pid ([`tmp_pid`]).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Suffix of every temporary name made here; no finished file ends with it.
pub const TMP_SUFFIX: &str = ".tmp";

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary name for `base` unique in this process and across live processes:
/// `base.<pid>-<n>.tmp`.
pub fn tmp_name(base: &str) -> String {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{base}.{}-{n}{TMP_SUFFIX}", std::process::id())
}

/// `dest` with its file name replaced by a [`tmp_name`] of it, in the same directory (so the
/// rename is atomic: same file system).
pub fn tmp_path(dest: &Path) -> PathBuf {
    let mut name = dest
        .file_name()
        .map(|s| s.to_os_string())
        .unwrap_or_default();
    name.push(tmp_name(""));
    dest.with_file_name(name)
}

/// The process id in a temporary name made by [`tmp_name`] or [`tmp_path`]
/// (`base.<pid>-<n>.tmp`; `base.<pid>.tmp` is accepted too), or `None` when `name` is not one.
pub fn tmp_pid(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(TMP_SUFFIX)?;
    let tail = stem.rsplit('.').next()?;
    tail.split('-').next()?.parse().ok()
}

/// fsyncs the directory `dir` so that renames in it are durable. An empty path means the
/// current directory. A no-op where directories cannot be opened (not Unix).
///
/// # Errors
/// Opening or syncing the directory failed.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Creates (or truncates) `path`, writes `bytes` and fsyncs it. Not atomic by itself: for
/// files inside a temporary directory that is renamed into place as a whole.
///
/// # Errors
/// Creating, writing or syncing the file failed.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Replaces `dest` with `bytes` atomically (see the [module](self) documentation).
///
/// # Errors
/// As [`write_atomic_with`].
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(dest, |f| f.write_all(bytes))
}

/// Replaces `dest` atomically with what `write` writes into the temporary file it is given
/// (for streaming writers), and returns `write`'s value. The temporary file is fsynced,
/// renamed over `dest`, and `dest`'s directory fsynced.
///
/// # Errors
/// The first error of `write`, creating, syncing or renaming the file, or syncing the
/// directory. On any error the temporary file is removed and an existing `dest` is untouched
/// (unless only the final directory sync failed: then `dest` is already replaced).
pub fn write_atomic_with<T>(
    dest: &Path,
    write: impl FnOnce(&mut File) -> io::Result<T>,
) -> io::Result<T> {
    let tmp = tmp_path(dest);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        let value = write(&mut f)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, dest)?;
        sync_dir(dest.parent().unwrap_or(Path::new("")))?;
        Ok(value)
    })();
    if result.is_err() {
        // Best effort: the error that matters is the one returned.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_atomic_replaces_the_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.json");
        write_atomic(&path, b"old").expect("first write");
        write_atomic(&path, b"new content").expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"new content");
        assert_eq!(names(dir.path()), ["a.json"]);
    }

    #[test]
    fn a_failing_writer_keeps_the_old_file_and_removes_the_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.bin");
        write_atomic(&path, b"old").expect("write");
        let err = write_atomic_with(&path, |f| {
            f.write_all(b"half")?;
            Err::<(), _>(io::Error::other("disk full"))
        })
        .expect_err("the writer fails");
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(std::fs::read(&path).expect("read"), b"old");
        assert_eq!(names(dir.path()), ["a.bin"]);
    }

    #[test]
    fn write_atomic_with_returns_the_writers_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("streamed");
        let n = write_atomic_with(&path, |f| {
            f.write_all(b"abc")?;
            Ok(3)
        })
        .expect("write");
        assert_eq!(n, 3);
        assert_eq!(std::fs::read(&path).expect("read"), b"abc");
    }

    #[test]
    fn a_missing_directory_is_an_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing/a");
        assert!(write_atomic(&path, b"x").is_err());
        assert_eq!(names(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn temporary_names_carry_the_pid_and_are_unique() {
        let pid = std::process::id();
        let a = tmp_name("seg-000001.vectors");
        let b = tmp_name("seg-000001.vectors");
        assert_ne!(a, b);
        assert!(
            a.starts_with("seg-000001.vectors.") && a.ends_with(TMP_SUFFIX),
            "{a}"
        );
        assert_eq!(tmp_pid(&a), Some(pid));
        let p = tmp_path(Path::new("dir/manifest.json"));
        assert_eq!(p.parent(), Some(Path::new("dir")));
        let name = p.file_name().and_then(|n| n.to_str()).expect("utf-8");
        assert!(name.starts_with("manifest.json."), "{name}");
        assert_eq!(tmp_pid(name), Some(pid));
        assert_eq!(tmp_pid("x.123.tmp"), Some(123));
        assert_eq!(tmp_pid("seg-000001.vectors.0-3.tmp"), Some(0));
        assert_eq!(tmp_pid("x.notapid.tmp"), None);
        assert_eq!(tmp_pid("manifest.json"), None);
    }

    #[test]
    fn a_relative_file_name_syncs_the_current_directory() {
        sync_dir(Path::new("")).expect("the current directory");
    }
}
