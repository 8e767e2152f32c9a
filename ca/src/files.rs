//! Writing and reading PEM files safely: atomic replacement, `0600` for secrets, and refusal to load a
//! private key that other users can read (the way OpenSSH refuses a world-readable identity file).
//!
//! These are the only file operations in the crate; the caller passes every path.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode for private keys and other secrets.
pub const SECRET_MODE: u32 = 0o600;
/// Mode for certificates and bundles, which are public.
pub const PUBLIC_MODE: u32 = 0o644;

/// A file that could not be read or written, with the path in the message.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "{path} is readable by other users (mode {mode:04o}); a private key must be 0600: run `chmod 600 {path}`"
    )]
    KeyTooOpen { path: PathBuf, mode: u32 },
    #[error("{path} is larger than {limit} bytes; it is not a PEM file Strait expects")]
    TooLarge { path: PathBuf, limit: u64 },
}

/// PEM files Strait reads are certificates, chains, keys and CSRs: a megabyte is far beyond any of them,
/// and the bound keeps a wrong path (a log, a device) from being read into memory whole.
const MAX_PEM_FILE: u64 = 1 << 20;

/// Writes `contents` to `path` atomically with the given mode: a temporary file in the same directory is
/// written, flushed to disk and renamed over the target, and the directory is synced, so a crash leaves
/// either the old file or the new one, never a torn one. The temporary file is created with `mode` from the
/// start (never briefly world-readable).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let err = |source| FileError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| err(io::Error::new(io::ErrorKind::InvalidInput, "no file name")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode further, which is fine; it never widens it. A pre-existing
        // file at `tmp` was removed above, so create_new guarantees this file is ours.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Reads a PEM file (bounded size).
pub fn read_pem(path: &Path) -> Result<String, FileError> {
    let err = |source| FileError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(err)?;
    if meta.len() > MAX_PEM_FILE {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            limit: MAX_PEM_FILE,
        });
    }
    fs::read_to_string(path).map_err(err)
}

/// Reads a private key file, refusing one that group or others can access.
pub fn read_secret_pem(path: &Path) -> Result<String, FileError> {
    check_private_mode(path)?;
    read_pem(path)
}

/// Reads a secret file of any format (at most 1 MiB), refusing one that group or others can access.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, FileError> {
    check_private_mode(path)?;
    let len = fs::metadata(path)
        .map_err(|source| FileError::Read {
            path: path.to_owned(),
            source,
        })?
        .len();
    if len > MAX_PEM_FILE {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            limit: MAX_PEM_FILE,
        });
    }
    fs::read(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Fails unless only the owner may read `path`.
pub fn check_private_mode(path: &Path) -> Result<(), FileError> {
    let meta = fs::metadata(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(FileError::KeyTooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Creates a directory (and parents) that only its owner can enter, for CA and proxy state.
pub fn create_private_dir(path: &Path) -> Result<(), FileError> {
    fs::create_dir_all(path)
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(0o700)))
        .map_err(|source| FileError::Write {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        write_atomic(&p, b"one", SECRET_MODE).unwrap();
        write_atomic(&p, b"two", SECRET_MODE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        // No temporary file left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn secret_reader_refuses_open_modes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        write_atomic(&p, b"k", 0o640).unwrap();
        let e = read_secret_pem(&p).unwrap_err();
        assert!(
            matches!(e, FileError::KeyTooOpen { mode: 0o640, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_pem(&p).unwrap(), "k");
    }
}
