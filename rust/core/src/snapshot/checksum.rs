//! Checksums: Adler-32 exactly as `zlib.adler32` (SIMD per chunk, chunks in
//! parallel, combined with zlib's `adler32_combine` algebra) and XXH3-64 for
//! rollstream's own format.

use rayon::prelude::*;

const BASE: u64 = 65521;
/// Below this size threads cost more than they save.
const PARALLEL_CHUNK: usize = 4 << 20;

/// Adler-32 of `data` continuing from `start` (1 for a fresh checksum).
pub fn adler32_serial(start: u32, data: &[u8]) -> u32 {
    let mut h = simd_adler32::Adler32::from_checksum(start);
    h.write(data);
    h.finish()
}

/// Adler-32 of `A ++ B` from `adler(A)`, `adler(B)` and `len(B)`.
///
/// With `a = 1 + Σ bytes` and `b = Σ a_i` (mod 65521), appending B shifts
/// every partial sum of B by `a(A) - 1` over its `len(B)` positions, so
/// `a = a1 + a2 - 1` and `b = b1 + b2 + len(B) * (a1 - 1)`.
pub fn adler32_combine(adler1: u32, adler2: u32, len2: u64) -> u32 {
    let rem = len2 % BASE;
    let a1 = u64::from(adler1 & 0xffff);
    let b1 = u64::from(adler1 >> 16);
    let a2 = u64::from(adler2 & 0xffff);
    let b2 = u64::from(adler2 >> 16);
    let a = (a1 + a2 + BASE - 1) % BASE;
    let b = (b1 + b2 + rem * a1 % BASE + BASE - rem) % BASE;
    ((b << 16) | a) as u32
}

/// Adler-32 of `data` continuing from `start`, on all cores for large inputs.
pub fn adler32(start: u32, data: &[u8]) -> u32 {
    if data.len() < 2 * PARALLEL_CHUNK {
        return adler32_serial(start, data);
    }
    let parts: Vec<(u32, u64)> =
        data.par_chunks(PARALLEL_CHUNK).map(|c| (adler32_serial(1, c), c.len() as u64)).collect();
    parts.into_iter().fold(start, |acc, (a, len)| adler32_combine(acc, a, len))
}

/// XXH3-64 of `data`.
pub fn xxh3(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Straight from the definition, for reference.
    fn naive(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u64, 0u64);
        for &x in data {
            a = (a + u64::from(x)) % BASE;
            b = (b + a) % BASE;
        }
        ((b << 16) | a) as u32
    }

    #[test]
    fn known_values() {
        assert_eq!(adler32(1, b""), 1);
        assert_eq!(adler32(1, b"Wikipedia"), 0x11E6_0398);
        let big: Vec<u8> = (0..(9 << 20)).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(adler32(1, &big), naive(&big));
    }

    proptest! {
        #[test]
        fn combine_equals_concatenation(a in proptest::collection::vec(any::<u8>(), 0..3000),
                                        b in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
            prop_assert_eq!(adler32_combine(naive(&a), naive(&b), b.len() as u64), naive(&whole));
            prop_assert_eq!(adler32_serial(naive(&a), &b), naive(&whole));
        }
    }
}
