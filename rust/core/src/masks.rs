//! Applying sampling masks to logits: every entry of a row outside the row's
//! kept token ids becomes `fill` (usually -inf).
//!
//! Per row: gather the kept values, fill the whole row (a memset-speed
//! store), scatter the kept values back. Rows run in parallel. The kernel
//! works on bit patterns (`u16` for f16/bf16, `u32` for f32, `u64` for f64),
//! so one implementation serves every float type; the caller passes `fill`
//! already encoded in the element type.
//!
//! Everything is validated before any byte is written: token ids outside
//! `[0, vocab)`, offsets that are not non-decreasing, or rows that do not fit
//! the logits give an error naming the row, never an out-of-bounds write.

use std::fmt;

use rayon::prelude::*;

/// A mask in CSR form borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub struct MaskRef<'a> {
    /// Kept token ids, rows concatenated.
    pub token_ids: &'a [i32],
    /// `offsets[r]..offsets[r+1]` are row `r`'s ids; `rows + 1` entries from 0.
    pub offsets: &'a [i64],
}

impl MaskRef<'_> {
    pub fn rows(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }
}

/// Largest vocabulary a mask can index: token ids are int32.
pub const MAX_VOCAB: usize = 1 << 31;

/// Why a mask operation failed: bad arguments, or a result too large to
/// allocate (told apart so Python raises `ValueError` or `MemoryError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskErrorKind {
    Invalid,
    OutOfMemory,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskError {
    pub kind: MaskErrorKind,
    pub row: Option<usize>,
    pub message: String,
}

impl fmt::Display for MaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.row {
            Some(r) => write!(f, "sampling mask row {r}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for MaskError {}

fn err<T>(row: Option<usize>, message: impl Into<String>) -> Result<T, MaskError> {
    Err(MaskError { kind: MaskErrorKind::Invalid, row, message: message.into() })
}

/// Check a mask against `vocab`, and `keep` (one id per row, negative = none).
pub fn validate(mask: MaskRef<'_>, vocab: usize, keep: Option<&[i64]>) -> Result<(), MaskError> {
    let offs = mask.offsets;
    if offs.is_empty() || offs[0] != 0 {
        return err(None, "offsets must start with 0");
    }
    if offs[offs.len() - 1] != mask.token_ids.len() as i64 {
        return err(
            None,
            format!("offsets end at {} but there are {} token ids", offs[offs.len() - 1], mask.token_ids.len()),
        );
    }
    for (r, w) in offs.windows(2).enumerate() {
        if w[1] < w[0] {
            return err(Some(r), format!("offsets decrease ({} -> {})", w[0], w[1]));
        }
    }
    // Parallel scan for the first bad id (rows are independent).
    let bad = (0..mask.rows()).into_par_iter().find_first(|&r| {
        let ids = &mask.token_ids[offs[r] as usize..offs[r + 1] as usize];
        ids.iter().any(|&t| t < 0 || t as usize >= vocab)
    });
    if let Some(r) = bad {
        let ids = &mask.token_ids[offs[r] as usize..offs[r + 1] as usize];
        let t = ids.iter().find(|&&t| t < 0 || t as usize >= vocab).copied().unwrap_or(-1);
        return err(Some(r), format!("token id {t} is outside the vocabulary [0, {vocab})"));
    }
    if let Some(keep) = keep {
        if keep.len() != mask.rows() {
            return err(None, format!("keep has {} entries for {} mask rows", keep.len(), mask.rows()));
        }
        if let Some((r, &t)) = keep.iter().enumerate().find(|(_, &t)| t >= vocab as i64) {
            return err(Some(r), format!("keep id {t} is outside the vocabulary [0, {vocab})"));
        }
    }
    Ok(())
}

/// Mask rows `row_start..row_start + mask.rows()` of `logits` (row-major,
/// `vocab` columns) in place.
pub fn apply<T: Copy + Send + Sync>(
    logits: &mut [T],
    vocab: usize,
    row_start: usize,
    mask: MaskRef<'_>,
    fill: T,
    keep: Option<&[i64]>,
) -> Result<(), MaskError> {
    if vocab == 0 || logits.len() % vocab != 0 {
        return err(None, format!("logits of {} elements are not rows of {vocab}", logits.len()));
    }
    let total_rows = logits.len() / vocab;
    let rows = mask.rows();
    if row_start.checked_add(rows).is_none_or(|end| end > total_rows) {
        return err(None, format!("{rows} mask rows starting at row {row_start} exceed the {total_rows} logit rows"));
    }
    validate(mask, vocab, keep)?;
    let region = &mut logits[row_start * vocab..(row_start + rows) * vocab];
    region.par_chunks_mut(vocab).enumerate().for_each_init(Vec::new, |saved: &mut Vec<(usize, T)>, (r, row)| {
        let ids = &mask.token_ids[mask.offsets[r] as usize..mask.offsets[r + 1] as usize];
        saved.clear();
        saved.extend(ids.iter().map(|&t| (t as usize, row[t as usize])));
        if let Some(k) = keep.and_then(|k| usize::try_from(k[r]).ok()) {
            saved.push((k, row[k]));
        }
        row.fill(fill);
        for &(i, v) in saved.iter() {
            row[i] = v;
        }
    });
    Ok(())
}

/// Dense boolean form: `out[r * vocab + t]` is true when `t` is kept in row `r`.
/// The size is checked (and the allocation fallible) before anything is
/// allocated: a wrong `vocab` is an error, never an aborted process.
pub fn to_dense(mask: MaskRef<'_>, vocab: usize) -> Result<Vec<bool>, MaskError> {
    if vocab > MAX_VOCAB {
        return err(None, format!("vocab_size={vocab} exceeds {MAX_VOCAB}, the most int32 token ids can index"));
    }
    validate(mask, vocab, None)?;
    let rows = mask.rows();
    let oom = |what: String| MaskError { kind: MaskErrorKind::OutOfMemory, row: None, message: what };
    let len = rows.checked_mul(vocab).ok_or_else(|| oom(format!("a dense mask of {rows} x {vocab} overflows")))?;
    let mut out = Vec::new();
    out.try_reserve_exact(len)
        .map_err(|_| oom(format!("a dense mask of {rows} x {vocab} ({len} bytes) cannot be allocated")))?;
    out.resize(len, false);
    out.par_chunks_mut(vocab.max(1)).enumerate().for_each(|(r, row)| {
        for &t in &mask.token_ids[mask.offsets[r] as usize..mask.offsets[r + 1] as usize] {
            row[t as usize] = true;
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn applies_and_keeps() {
        let mut logits: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let ids = [1, 3, 0];
        let offs = [0i64, 2, 3];
        apply(&mut logits, 4, 1, MaskRef { token_ids: &ids, offsets: &offs }, f32::NEG_INFINITY, Some(&[-1, 2]))
            .unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(logits, vec![0., 1., 2., 3., inf, 5., inf, 7., 8., inf, 10., inf]);
    }

    #[test]
    fn bad_input_names_the_row_and_writes_nothing() {
        let mut logits = vec![1.0f32; 8];
        let before = logits.clone();
        let cases: Vec<(usize, &[i32], &[i64])> =
            vec![(4, &[0, 9], &[0, 1, 2]), (4, &[0, -1], &[0, 1, 2]), (2, &[0, 1], &[0, 2, 1, 2])];
        for (vocab, ids, offs) in cases {
            let e = apply(&mut logits, vocab, 0, MaskRef { token_ids: ids, offsets: offs }, 0.0, None).unwrap_err();
            assert!(e.row.is_some(), "{e}");
            assert_eq!(logits, before);
        }
        let e = apply(&mut logits, 4, 1, MaskRef { token_ids: &[0, 1], offsets: &[0, 1, 2] }, 0.0, None).unwrap_err();
        assert!(e.message.contains("exceed"));
        assert!(apply(&mut logits, 3, 0, MaskRef { token_ids: &[], offsets: &[0] }, 0.0, None).is_err());
    }

    proptest! {
        #[test]
        fn matches_dense_reference(rows in 0usize..20, vocab in 1usize..50, seed in any::<u64>()) {
            let mut state = seed;
            let mut next = || { state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (state >> 33) as usize };
            let mut ids = Vec::new();
            let mut offs = vec![0i64];
            for _ in 0..rows {
                let k = next() % (vocab + 1);
                let mut row: Vec<i32> = (0..k).map(|_| (next() % vocab) as i32).collect();
                row.sort_unstable();
                row.dedup();
                ids.extend(&row);
                offs.push(ids.len() as i64);
            }
            let mask = MaskRef { token_ids: &ids, offsets: &offs };
            let mut logits: Vec<u32> = (0..rows * vocab).map(|i| i as u32).collect();
            apply(&mut logits, vocab, 0, mask, u32::MAX, None).unwrap();
            let dense = to_dense(mask, vocab).unwrap();
            for (i, v) in logits.iter().enumerate() {
                prop_assert_eq!(*v, if dense[i] { i as u32 } else { u32::MAX });
            }
        }
    }

    #[test]
    fn dense_sizes_are_checked_before_allocating() {
        let mask = MaskRef { token_ids: &[1, 2], offsets: &[0, 1, 2] };
        let e = to_dense(mask, 1 << 40).unwrap_err();
        assert_eq!(e.kind, MaskErrorKind::Invalid);
        assert!(e.message.contains("vocab_size=1099511627776"), "{e}");
        // Within the vocabulary limit but far beyond memory: an error, not an abort.
        let offsets: Vec<i64> = vec![0; 1 << 20];
        let e = to_dense(MaskRef { token_ids: &[], offsets: &offsets }, MAX_VOCAB).unwrap_err();
        assert_eq!(e.kind, MaskErrorKind::OutOfMemory, "{e}");
        assert_eq!(to_dense(mask, 3).unwrap(), vec![false, true, false, false, false, true]);
    }
}
