//! Atomic publication: results are written next to where they will live
//! and renamed into place only when complete.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::checksum::xxh3;
use super::SnapshotError;

/// A temporary file next to `dest`, renamed onto it by `publish`; removed
/// if dropped unpublished, so a failure never leaves a partial result where
/// the result would live.
pub struct PendingFile {
    tmp: PathBuf,
    dest: PathBuf,
    published: bool,
}

impl PendingFile {
    pub fn new(dest: &Path) -> Result<Self, SnapshotError> {
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(SnapshotError::Invalid(format!("output directory {} does not exist", parent.display())));
        }
        let name =
            dest.file_name().ok_or_else(|| SnapshotError::Invalid(format!("bad output path {}", dest.display())))?;
        let nonce: u64 =
            xxh3(format!("{:?}{:?}", std::time::SystemTime::now(), std::thread::current().id()).as_bytes());
        let tmp = parent.join(format!(".{}.{}.{nonce:016x}.tmp", name.to_string_lossy(), std::process::id()));
        Ok(PendingFile { tmp, dest: dest.to_path_buf(), published: false })
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn publish(mut self) -> Result<(), SnapshotError> {
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| SnapshotError::io(&self.dest, e))?;
        self.published = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Write `bytes` to `dest` atomically (temporary file, fsync, rename).
pub fn publish_bytes(dest: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let pending = PendingFile::new(dest)?;
    write_all(pending.path(), bytes)?;
    pending.publish()
}

fn write_all(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut f = File::create(path).map_err(|e| SnapshotError::io(path, e))?;
    f.write_all(bytes).map_err(|e| SnapshotError::io(path, e))?;
    f.sync_all().map_err(|e| SnapshotError::io(path, e))
}
