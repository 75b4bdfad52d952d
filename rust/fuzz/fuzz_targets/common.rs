//! Inputs shared by the codec targets: a small base checkpoint, valid deltas
//! of it in both formats, and the ways the fuzzer's bytes turn a valid image
//! into a hostile one (libFuzzer rarely finds valid JSON headers and zstd
//! frames from nothing, so most inputs start from a valid image).
// Each target uses part of the fixture.
#![allow(dead_code)]

use std::sync::OnceLock;

use rollstream_core::snapshot::delta::{encode_arc_v2, encode_rsd1, EncodeOptions, Named, OwnedTensor};
use rollstream_core::snapshot::safetensors::{Dtype, TensorView};

type Tensor = (&'static str, Dtype, Vec<usize>, Vec<u8>);

fn checkpoint(step: u32) -> Vec<Tensor> {
    let f32s: Vec<u8> = (0..300u32)
        .flat_map(|i| ((i as f32 * 0.37).sin() + if step > 0 && i % 3 == 0 { 1e-3 } else { 0.0 }).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = (0..64u16).flat_map(|i| (i.wrapping_mul(977) ^ step as u16).to_le_bytes()).collect();
    let i64s: Vec<u8> = [1i64, -2, i64::from(step)].iter().flat_map(|x| x.to_le_bytes()).collect();
    vec![("w", Dtype::F32, vec![30, 10], f32s), ("b", Dtype::BF16, vec![64], bf16), ("i", Dtype::I64, vec![3], i64s)]
}

fn views(tensors: &[Tensor]) -> Vec<Named<'_>> {
    tensors.iter().map(|(n, d, s, data)| Named { name: n, view: TensorView { dtype: *d, shape: s, data } }).collect()
}

pub struct Fixture {
    pub base: Vec<Tensor>,
    pub new: Vec<Tensor>,
    pub rsd1: Vec<u8>,
    pub arc_v2: Vec<u8>,
}

impl Fixture {
    pub fn base(&self) -> Vec<Named<'_>> {
        views(&self.base)
    }

    /// Whether `out` is exactly the new checkpoint.
    pub fn is_new(&self, out: &[OwnedTensor]) -> bool {
        out.len() == self.new.len()
            && out
                .iter()
                .zip(&self.new)
                .all(|(o, (n, d, s, data))| o.name == *n && o.dtype == *d && &o.shape == s && &o.data == data)
    }

    /// Every decoded tensor has a base tensor's name, dtype and shape, and
    /// exactly the bytes that shape holds.
    pub fn well_formed(&self, out: &[OwnedTensor]) -> bool {
        out.iter().all(|o| {
            self.base.iter().any(|(n, d, s, _)| o.name == *n && o.dtype == *d && &o.shape == s)
                && o.dtype.nbytes(&o.shape) == Some(o.data.len())
        })
    }
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (base, new) = (checkpoint(0), checkpoint(1));
        let opts = EncodeOptions { chunk_elems: 50, ..Default::default() };
        let (rsd1, _) = encode_rsd1(&views(&base), &views(&new), opts, &Default::default()).expect("valid rsd1");
        let (arc_v2, _) = encode_arc_v2(&views(&base), &views(&new), 1).expect("valid arc_v2");
        Fixture { base, new, rsd1, arc_v2 }
    })
}

/// How an input became a delta image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Made {
    /// The input's bytes as they are.
    Raw,
    /// A valid image with bytes flipped or cut: only the valid result (or an error) is acceptable.
    Edited,
    /// A valid image's payload under a header taken from the input.
    Header,
}

/// Turn fuzzer bytes into a delta image derived from `valid`, whose header
/// (JSON) follows `prefix` bytes of magic and starts after an 8-byte length.
pub fn make(valid: &[u8], magic: &[u8], data: &[u8]) -> (Made, Vec<u8>) {
    let Some((&mode, rest)) = data.split_first() else { return (Made::Raw, Vec::new()) };
    match mode % 4 {
        0 => (Made::Raw, rest.to_vec()),
        1 => {
            // (u16 position, xor byte) edits.
            let mut out = valid.to_vec();
            for e in rest.chunks_exact(3) {
                let at = usize::from(u16::from_le_bytes([e[0], e[1]])) % out.len();
                out[at] ^= e[2].max(1);
            }
            (Made::Edited, out)
        }
        2 => {
            // Cut at a position, then append the rest of the input.
            let (cut, tail) = rest.split_first_chunk::<2>().map_or((0, &[][..]), |(c, t)| (u16::from_le_bytes(*c), t));
            let mut out = valid[..usize::from(cut) % (valid.len() + 1)].to_vec();
            out.extend_from_slice(tail);
            (Made::Raw, out)
        }
        _ => {
            let hlen_at = magic.len();
            let hlen = u64::from_le_bytes(valid[hlen_at..hlen_at + 8].try_into().expect("8 bytes")) as usize;
            let payload = &valid[hlen_at + 8 + hlen..];
            let mut out = magic.to_vec();
            out.extend_from_slice(&(rest.len() as u64).to_le_bytes());
            out.extend_from_slice(rest);
            out.extend_from_slice(payload);
            (Made::Header, out)
        }
    }
}
