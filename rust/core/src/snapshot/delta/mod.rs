//! Delta codecs between two checkpoints with the same tensors.
//!
//! **arc_v2** (Fireworks' format, decodable by `fireworks-delta-compression`):
//! per tensor, the XOR of the raw little-endian bytes of the old and new
//! tensor, compressed as one zstd frame that records its content size, stored
//! in a safetensors file as 1-D U8 tensors under the original names, with
//! `__metadata__` mapping each name to the decimal Adler-32 of the new tensor.
//!
//! **rsd1** (rollstream's format): tensors are cut into chunks of
//! `chunk_elems` elements, so all cores work and decoding holds only a few
//! chunks in memory. Per chunk, the element-wise integer difference of the
//! bit patterns (zigzagged: small weight updates become small numbers) is
//! split into byte planes, so unchanged high bytes form long zero runs; when
//! few elements changed, the gaps between the changed ones plus their planes
//! are stored instead. One zstd frame per chunk. Every chunk records XXH3 of
//! its base and new bytes, so a wrong base or a corrupted byte is found and named
//! (tensor, chunk) before any output is published. The output is a function
//! of the inputs only (no timing-dependent choices), and there is no pickle.
//!
//! File layout: `b"RSDELTA1"`, u64 LE header length, JSON header, payload.

mod arc_v2;
mod files;
mod memory;
mod planes;
mod rsd1;
mod types;
mod zstd_frame;

pub use arc_v2::{decode_arc_v2, encode_arc_v2};
pub use files::{decode_files, encode_files, encode_from_file};
pub use memory::decode_to_vecs;
pub use rsd1::{decode_rsd1, encode_rsd1, RSD_MAGIC};
pub use types::{EncodeOptions, Format, Named, OwnedTensor, Stats, DEFAULT_CHUNK_ELEMS};

#[cfg(test)]
mod tests;
