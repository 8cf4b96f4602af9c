//! Storage behind a small trait: [`Directory`], with a filesystem ([`FsDirectory`]) and an
//! in-memory ([`RamDirectory`]) implementation.
//!
//! The index only ever reads whole files ([`Directory::open_read`], memory-mapped on disk) and
//! replaces whole files atomically ([`Directory::atomic_write`]); it never edits a file in place.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};

/// Suffix of temporary files; names ending with it are never part of an index.
pub const TMP_SUFFIX: &str = ragtune_util::fs::TMP_SUFFIX;

/// Read-only bytes of one file, owned through an `Arc` (a memory map on disk, a buffer in RAM).
///
/// Cloning is cheap; the bytes stay valid as long as any clone lives. The start of the bytes is
/// aligned to at least 64 bytes (page-aligned for maps), so fixed-width arrays at 64-byte offsets
/// can be reinterpreted in place.
#[derive(Clone)]
pub struct FileBytes {
    owner: Arc<dyn Deref<Target = [u8]> + Send + Sync>,
    /// The mapped file, kept open to detect a truncation by another process.
    file: Option<Arc<fs::File>>,
}

impl fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileBytes")
            .field("len", &self.len())
            .finish()
    }
}

impl FileBytes {
    /// Wraps any owner of bytes.
    pub fn new(owner: Arc<dyn Deref<Target = [u8]> + Send + Sync>) -> Self {
        FileBytes { owner, file: None }
    }

    /// Whether the file behind a memory map is still at least as long as the map. Index
    /// files are immutable once written (see the crate docs); a file truncated in place by
    /// another process would make reading the lost pages a SIGBUS, so searches call this
    /// (one `fstat`) before reading a segment and report corruption instead. A truncation
    /// between this check and the read can still fault: the check narrows the window, it
    /// cannot close it. Always true for bytes not backed by a file.
    pub fn still_intact(&self) -> bool {
        match &self.file {
            None => true,
            Some(f) => f
                .metadata()
                .is_ok_and(|m| m.len() >= self.owner.len() as u64),
        }
    }

    /// Copies `bytes` into a fresh 64-byte-aligned buffer.
    pub fn from_slice(bytes: &[u8]) -> Self {
        FileBytes::new(Arc::new(AlignedBuf::from_slice(bytes)))
    }

    /// The bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.owner
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.owner.len()
    }

    /// True when the file is empty.
    pub fn is_empty(&self) -> bool {
        self.owner.len() == 0
    }
}

impl Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.owner
    }
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u8; 64]);

/// A heap buffer whose first byte is 64-byte aligned.
struct AlignedBuf {
    blocks: Vec<Block>,
    len: usize,
}

impl AlignedBuf {
    fn from_slice(bytes: &[u8]) -> Self {
        let mut blocks = vec![Block([0; 64]); bytes.len().div_ceil(64)];
        for (block, src) in blocks.iter_mut().zip(bytes.chunks(64)) {
            block.0[..src.len()].copy_from_slice(src);
        }
        AlignedBuf {
            blocks,
            len: bytes.len(),
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `Block` is `repr(C)` over `[u8; 64]` with no padding, so the `Vec<Block>`
        // storage is `blocks.len() * 64` initialised bytes; `len <= blocks.len() * 64`.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), self.len) }
    }
}

/// A read-only memory map, owned so that [`FileBytes`] can hold it through an `Arc`.
struct MmapOwner(memmap2::Mmap);

impl Deref for MmapOwner {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// Where the files of one index live.
///
/// Names are plain file names (no separators). Implementations must make
/// [`atomic_write`](Directory::atomic_write) all-or-nothing: after a crash a reader sees either
/// the old content of `name` or the new one, never a mix. Names ending in [`TMP_SUFFIX`] are
/// reserved for implementations' temporary files.
pub trait Directory: Send + Sync + fmt::Debug {
    /// The whole content of `name`.
    ///
    /// # Errors
    /// [`Error::NotFound`] if there is no such file, [`Error::Io`] on other failures.
    fn open_read(&self, name: &str) -> Result<FileBytes>;
    /// Replaces (or creates) `name` with `bytes`, atomically and durably.
    ///
    /// # Errors
    /// [`Error::Io`].
    fn atomic_write(&self, name: &str, bytes: &[u8]) -> Result<()>;
    /// Removes `name`; removing a missing file is not an error.
    ///
    /// # Errors
    /// [`Error::Io`].
    fn delete(&self, name: &str) -> Result<()>;
    /// Names of all files, in no particular order (temporary files included).
    ///
    /// # Errors
    /// [`Error::Io`].
    fn list(&self) -> Result<Vec<String>>;
    /// Whether `name` exists.
    ///
    /// # Errors
    /// [`Error::Io`].
    fn exists(&self, name: &str) -> Result<bool>;
    /// A path naming `name` in error messages (a real path for the filesystem).
    fn path_of(&self, name: &str) -> PathBuf;
    /// A path naming the directory itself in error messages.
    fn root(&self) -> PathBuf;
}

/// Whether a temporary name made by [`ragtune_util::fs::tmp_name`] (`<base>.<pid>-<n>.tmp`,
/// the scheme of every atomic write in the workspace) was left by a process that no longer
/// runs (its writer crashed), so it can be swept. Names of live processes, and names this
/// cannot parse, are kept.
pub(crate) fn is_stale_tmp(name: &str) -> bool {
    let Some(pid) = ragtune_util::fs::tmp_pid(name) else {
        return false;
    };
    if pid == std::process::id() {
        return false;
    }
    process_gone(pid)
}

#[cfg(target_os = "linux")]
fn process_gone(pid: u32) -> bool {
    !Path::new("/proc").join(pid.to_string()).exists()
}

#[cfg(not(target_os = "linux"))]
fn process_gone(_pid: u32) -> bool {
    false
}

/// A directory on the filesystem. Files are memory-mapped for reading.
#[derive(Debug, Clone)]
pub struct FsDirectory {
    root: PathBuf,
}

impl FsDirectory {
    /// Opens an existing directory.
    ///
    /// # Errors
    /// [`Error::NotFound`] if `root` is not a directory.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(Error::NotFound { path: root });
        }
        Ok(FsDirectory { root })
    }

    /// Opens `root`, creating it (and its parents) if needed.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn create(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        Ok(FsDirectory { root })
    }

    /// The directory path.
    pub fn path(&self) -> &Path {
        &self.root
    }

    fn check_name(&self, name: &str) -> Result<()> {
        if name.is_empty() || name.contains('/') || name.contains('\\') || name == ".." {
            return Err(Error::InvalidFileName {
                name: name.to_string(),
            });
        }
        Ok(())
    }
}

/// Memory-maps `file` read-only.
///
/// # Safety
/// The caller must ensure the file is not modified or truncated while the map lives. This crate
/// upholds that by never writing to a file after it is complete: files are replaced by renaming
/// a new file over the name, which leaves the old inode (and its maps) untouched. An outside
/// process editing index files in place breaks this contract.
unsafe fn map_file(file: &fs::File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: forwarded to the caller, see the function's `# Safety` section.
    unsafe { memmap2::MmapOptions::new().populate().map(file) }
}

impl Directory for FsDirectory {
    fn open_read(&self, name: &str) -> Result<FileBytes> {
        self.check_name(name)?;
        let path = self.root.join(name);
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound { path })
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len == 0 {
            // Zero-length maps are not portable; an empty buffer behaves the same.
            return Ok(FileBytes::from_slice(&[]));
        }
        // SAFETY: index files are immutable once renamed into place (see `map_file`).
        let map = unsafe { map_file(&file) }.map_err(|e| Error::io(&path, e))?;
        let mut bytes = FileBytes::new(Arc::new(MmapOwner(map)));
        bytes.file = Some(Arc::new(file));
        Ok(bytes)
    }

    fn atomic_write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.check_name(name)?;
        let dst = self.root.join(name);
        ragtune_util::fs::write_atomic(&dst, bytes).map_err(|e| Error::io(&dst, e))
    }

    fn delete(&self, name: &str) -> Result<()> {
        self.check_name(name)?;
        let path = self.root.join(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    fn list(&self) -> Result<Vec<String>> {
        let rd = fs::read_dir(&self.root).map_err(|e| Error::io(&self.root, e))?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(&self.root, e))?;
            let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
            if let (true, Some(name)) = (is_file, entry.file_name().to_str()) {
                out.push(name.to_string());
            }
        }
        Ok(out)
    }

    fn exists(&self, name: &str) -> Result<bool> {
        self.check_name(name)?;
        Ok(self.root.join(name).is_file())
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn root(&self) -> PathBuf {
        self.root.clone()
    }
}

/// An in-memory directory, for tests and ephemeral indexes. Clones share the same files.
#[derive(Debug, Clone, Default)]
pub struct RamDirectory {
    files: Arc<RwLock<BTreeMap<String, FileBytes>>>,
}

impl RamDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `bytes` to `name` directly, bypassing atomicity (for tests that damage files).
    pub fn write_raw(&self, name: &str, bytes: &[u8]) {
        let mut files = self.files.write().unwrap_or_else(|p| p.into_inner());
        files.insert(name.to_string(), FileBytes::from_slice(bytes));
    }
}

impl Directory for RamDirectory {
    fn open_read(&self, name: &str) -> Result<FileBytes> {
        let files = self.files.read().unwrap_or_else(|p| p.into_inner());
        files.get(name).cloned().ok_or_else(|| Error::NotFound {
            path: self.path_of(name),
        })
    }

    fn atomic_write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write_raw(name, bytes);
        Ok(())
    }

    fn delete(&self, name: &str) -> Result<()> {
        let mut files = self.files.write().unwrap_or_else(|p| p.into_inner());
        files.remove(name);
        Ok(())
    }

    fn list(&self) -> Result<Vec<String>> {
        let files = self.files.read().unwrap_or_else(|p| p.into_inner());
        Ok(files.keys().cloned().collect())
    }

    fn exists(&self, name: &str) -> Result<bool> {
        let files = self.files.read().unwrap_or_else(|p| p.into_inner());
        Ok(files.contains_key(name))
    }

    fn path_of(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("ram:/{name}"))
    }

    fn root(&self) -> PathBuf {
        PathBuf::from("ram:/")
    }
}

/// The contract every [`Directory`] must satisfy; run by the tests against each implementation.
#[cfg(test)]
pub(crate) fn contract_suite(dir: &dyn Directory) {
    // missing file
    assert!(matches!(dir.open_read("nope"), Err(Error::NotFound { .. })));
    assert!(!dir.exists("nope").expect("exists"));
    // write / read back, aligned
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
    dir.atomic_write("a.bin", &data).expect("write");
    let got = dir.open_read("a.bin").expect("read");
    assert_eq!(&got[..], &data[..]);
    assert_eq!(
        got.as_ptr() as usize % 64,
        0,
        "FileBytes must be 64-byte aligned"
    );
    assert!(dir.exists("a.bin").expect("exists"));
    // replace: old bytes held by a reader stay valid
    dir.atomic_write("a.bin", b"new").expect("rewrite");
    assert_eq!(&got[..], &data[..]);
    assert_eq!(&dir.open_read("a.bin").expect("read")[..], b"new");
    // empty file
    dir.atomic_write("empty", b"").expect("write empty");
    assert!(dir.open_read("empty").expect("read empty").is_empty());
    // list shows files, no temp files left behind
    let mut names = dir.list().expect("list");
    names.sort();
    assert_eq!(names, vec!["a.bin".to_string(), "empty".to_string()]);
    // delete, idempotent
    dir.delete("a.bin").expect("delete");
    dir.delete("a.bin").expect("delete twice");
    assert!(!dir.exists("a.bin").expect("exists"));
    assert!(matches!(
        dir.open_read("a.bin"),
        Err(Error::NotFound { .. })
    ));
    assert!(dir.path_of("x").to_string_lossy().ends_with('x'));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporary_names() {
        assert!(!is_stale_tmp("seg-000001.vectors"));
        assert!(
            !is_stale_tmp(&ragtune_util::fs::tmp_name("manifest.json")),
            "our own"
        );
        // pid 0 is never a user process: /proc/0 does not exist.
        #[cfg(target_os = "linux")]
        assert!(is_stale_tmp("seg-000001.vectors.0-3.tmp"));
        assert!(!is_stale_tmp("x.notapid.tmp"));
    }

    #[test]
    fn ram_contract() {
        contract_suite(&RamDirectory::new());
    }

    #[test]
    fn fs_contract() {
        let tmp = tempfile::tempdir().expect("tempdir");
        contract_suite(&FsDirectory::create(tmp.path().join("d")).expect("create"));
    }
}
