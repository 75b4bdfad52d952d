//! rsd1's chunk transform: zigzagged element differences as byte planes
//! (dense), or the changed elements' gaps plus their planes (sparse).

/// A chunk with fewer changed elements than this fraction is stored sparsely.
const SPARSE_BELOW: f64 = 0.25;
const MODE_DENSE: u8 = 0;
const MODE_SPARSE: u8 = 1;

/// Sparse chunks list the changed elements by their gaps: one byte per
/// changed element holding the number of unchanged elements before it, with
/// 255 meaning "255 more, continue". (Measured: zstd codes these gap bytes
/// within 1% of their entropy, a packed bitmap 19% above it.)
fn push_gap(out: &mut Vec<u8>, mut gap: usize) {
    while gap >= 255 {
        out.push(255);
        gap -= 255;
    }
    out.push(gap as u8);
}

macro_rules! zigzag_impl {
    ($enc:ident, $dec:ident, $u:ty, $i:ty) => {
        /// Zigzagged wrapping differences `new - old` of `$u` elements as byte
        /// planes (`planes[p * m + j]` = byte `p` of value `j`); when
        /// `sparse`, only the changed elements, preceded by their count
        /// (u32 LE) and gap bytes.
        fn $enc(old: &[u8], new: &[u8], out: &mut Vec<u8>, sparse: bool) {
            const W: usize = std::mem::size_of::<$u>();
            let n = new.len() / W;
            let mut vals: Vec<$u> = Vec::with_capacity(if sparse { n / 4 } else { n });
            let mut gaps = Vec::new();
            let mut last = 0usize;
            for j in 0..n {
                let mut a = [0u8; W];
                let mut b = [0u8; W];
                a.copy_from_slice(&old[j * W..j * W + W]);
                b.copy_from_slice(&new[j * W..j * W + W]);
                let d = <$u>::from_le_bytes(b).wrapping_sub(<$u>::from_le_bytes(a)) as $i;
                let z = ((d << 1) ^ (d >> (<$i>::BITS - 1))) as $u;
                if !sparse {
                    vals.push(z);
                } else if z != 0 {
                    push_gap(&mut gaps, j - last);
                    last = j + 1;
                    vals.push(z);
                }
            }
            let m = vals.len();
            if sparse {
                out.extend_from_slice(&(m as u32).to_le_bytes());
                out.extend_from_slice(&gaps);
            }
            let start = out.len();
            out.resize(start + m * W, 0);
            for (j, v) in vals.iter().enumerate() {
                for (p, byte) in v.to_le_bytes().iter().enumerate() {
                    out[start + p * m + j] = *byte;
                }
            }
        }

        /// Inverse of the encoder: `new = old + unzigzag(z)` into `dst`.
        fn $dec(old: &[u8], body: &[u8], dst: &mut [u8], sparse: bool) -> Result<(), String> {
            const W: usize = std::mem::size_of::<$u>();
            let n = old.len() / W;
            // Positions of the stored values (None: every element, in order).
            let mut positions: Option<Vec<usize>> = None;
            let mut planes = body;
            if sparse {
                let (count, rest) = body.split_first_chunk::<4>().ok_or("sparse chunk without its count")?;
                let m = u32::from_le_bytes(*count) as usize;
                if m > n {
                    return Err(format!("sparse chunk claims {m} changed elements of {n}"));
                }
                let mut pos = Vec::with_capacity(m);
                let mut next = 0usize;
                let mut run = 0usize;
                let mut used = 0usize;
                while pos.len() < m {
                    let &g = rest.get(used).ok_or("sparse chunk ends inside its gaps")?;
                    used += 1;
                    run += usize::from(g);
                    if g == 255 {
                        continue;
                    }
                    let at = next + run;
                    if at >= n {
                        return Err("a gap points past the chunk".into());
                    }
                    pos.push(at);
                    next = at + 1;
                    run = 0;
                }
                planes = &rest[used..];
                positions = Some(pos);
            }
            let m = positions.as_ref().map_or(n, Vec::len);
            if planes.len() != m * W {
                return Err(format!("chunk holds {} plane bytes, expected {}", planes.len(), m * W));
            }
            dst.copy_from_slice(old);
            for k in 0..m {
                let j = positions.as_ref().map_or(k, |p| p[k]);
                let mut bytes = [0u8; W];
                for (p, byte) in bytes.iter_mut().enumerate() {
                    *byte = planes[p * m + k];
                }
                let z = <$u>::from_le_bytes(bytes);
                let d = ((z >> 1) as $i) ^ -((z & 1) as $i);
                let mut a = [0u8; W];
                a.copy_from_slice(&old[j * W..j * W + W]);
                let v = <$u>::from_le_bytes(a).wrapping_add(d as $u);
                dst[j * W..j * W + W].copy_from_slice(&v.to_le_bytes());
            }
            Ok(())
        }
    };
}

zigzag_impl!(enc_u8, dec_u8, u8, i8);
zigzag_impl!(enc_u16, dec_u16, u16, i16);
zigzag_impl!(enc_u32, dec_u32, u32, i32);
zigzag_impl!(enc_u64, dec_u64, u64, i64);

fn count_changed(old: &[u8], new: &[u8], w: usize) -> usize {
    old.chunks_exact(w).zip(new.chunks_exact(w)).filter(|(a, b)| a != b).count()
}

/// The raw (pre-zstd) body of one chunk: mode byte, then planes.
pub(super) fn chunk_body(old: &[u8], new: &[u8], w: usize) -> Vec<u8> {
    let n = new.len() / w;
    let sparse = (count_changed(old, new, w) as f64) < SPARSE_BELOW * n as f64;
    let mut out = Vec::with_capacity(1 + new.len() + if sparse { 4 + n / 4 } else { 0 });
    out.push(if sparse { MODE_SPARSE } else { MODE_DENSE });
    match w {
        1 => enc_u8(old, new, &mut out, sparse),
        2 => enc_u16(old, new, &mut out, sparse),
        4 => enc_u32(old, new, &mut out, sparse),
        _ => enc_u64(old, new, &mut out, sparse),
    }
    out
}

pub(super) fn apply_chunk(old: &[u8], body: &[u8], dst: &mut [u8], w: usize) -> Result<(), String> {
    let (&mode, rest) = body.split_first().ok_or("empty chunk")?;
    let sparse = match mode {
        MODE_DENSE => false,
        MODE_SPARSE => true,
        m => return Err(format!("unknown chunk mode {m}")),
    };
    match w {
        1 => dec_u8(old, rest, dst, sparse),
        2 => dec_u16(old, rest, dst, sparse),
        4 => dec_u32(old, rest, dst, sparse),
        _ => dec_u64(old, rest, dst, sparse),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn arbitrary_chunk_bodies_never_panic(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            w in proptest::sample::select(vec![1usize, 2, 4, 8]),
            n in 0usize..64,
        ) {
            let old = vec![7u8; n * w];
            let mut dst = vec![0u8; n * w];
            let _ = apply_chunk(&old, &body, &mut dst, w);
        }

        #[test]
        fn chunk_transform_round_trips(
            old in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            flips in proptest::collection::vec((0usize..512, proptest::prelude::any::<u8>()), 0..40),
            w in proptest::sample::select(vec![1usize, 2, 4, 8]),
        ) {
            let len = old.len() / w * w;
            let old = &old[..len];
            let mut new = old.to_vec();
            for (i, b) in flips {
                if len > 0 {
                    new[i % len] = b;
                }
            }
            let body = chunk_body(old, &new, w);
            let mut dst = vec![0u8; len];
            apply_chunk(old, &body, &mut dst, w).unwrap();
            proptest::prop_assert_eq!(dst, new);
        }
    }
}
