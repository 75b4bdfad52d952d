//! Weight snapshots: checksums, safetensors files and delta codecs.
//!
//! - [`checksum`]: Adler-32 (exactly `zlib.adler32`, SIMD and parallel) and XXH3.
//! - [`safetensors`]: validated reading (memory-mapped, or the header only) and writing.
//! - [`checkpoint`]: whole checkpoints written atomically with their checksums.
//! - [`delta`]: `arc_v2` (interoperable with Fireworks' reference) and
//!   `rsd1`, rollstream's own chunked, checksummed, deterministic format.
//! - [`atomic`]: publication by rename, so no partial result is ever visible.

pub mod atomic;
pub mod checkpoint;
pub mod checksum;
pub mod delta;
pub mod safetensors;

use std::fmt;
use std::path::Path;

/// Why a snapshot operation failed. Every variant names what it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    /// Reading or writing a file failed.
    Io { path: String, message: String },
    /// A file is not a valid safetensors / delta file.
    Corrupt { path: String, message: String },
    /// Base and delta (or base and new) disagree on a tensor.
    Mismatch { tensor: String, message: String },
    /// Decoded data does not match its recorded checksum.
    Checksum { tensor: String, chunk: Option<usize>, message: String },
    /// Bad arguments.
    Invalid(String),
}

impl SnapshotError {
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        SnapshotError::Io { path: path.display().to_string(), message: e.to_string() }
    }

    /// The same error, naming `path` where it named an in-memory image
    /// (`<...>`): the caller knew which file the bytes came from.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            SnapshotError::Corrupt { path: p, message } if p.starts_with('<') => {
                SnapshotError::Corrupt { path: path.display().to_string(), message }
            }
            other => other,
        }
    }

    pub(crate) fn mismatch(tensor: &str, message: impl Into<String>) -> Self {
        SnapshotError::Mismatch { tensor: tensor.to_string(), message: message.into() }
    }
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::Io { path, message } => write!(f, "{path}: {message}"),
            SnapshotError::Corrupt { path, message } => write!(f, "{path} is corrupt: {message}"),
            SnapshotError::Mismatch { tensor, message } => write!(f, "tensor {tensor:?}: {message}"),
            SnapshotError::Checksum { tensor, chunk: Some(c), message } => {
                write!(f, "tensor {tensor:?}, chunk {c}: {message}")
            }
            SnapshotError::Checksum { tensor, chunk: None, message } => write!(f, "tensor {tensor:?}: {message}"),
            SnapshotError::Invalid(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for SnapshotError {}
