//! Minimal reader for NumPy `.npy` payloads (format versions 1-3), as vLLM
//! sends routed-expert ids: base64 of `np.save` output. Only C-order,
//! little-endian (or byte-sized) integer and float arrays are accepted; that
//! covers every dtype vLLM uses and keeps the decoder free of surprises.

use std::fmt;

/// Element type of a decoded array, named as NumPy names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F16,
    F32,
    F64,
}

impl NpyDtype {
    pub fn itemsize(self) -> usize {
        match self {
            NpyDtype::U8 | NpyDtype::I8 => 1,
            NpyDtype::U16 | NpyDtype::I16 | NpyDtype::F16 => 2,
            NpyDtype::U32 | NpyDtype::I32 | NpyDtype::F32 => 4,
            NpyDtype::U64 | NpyDtype::I64 | NpyDtype::F64 => 8,
        }
    }

    /// The NumPy dtype string (`"int32"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            NpyDtype::U8 => "uint8",
            NpyDtype::I8 => "int8",
            NpyDtype::U16 => "uint16",
            NpyDtype::I16 => "int16",
            NpyDtype::U32 => "uint32",
            NpyDtype::I32 => "int32",
            NpyDtype::U64 => "uint64",
            NpyDtype::I64 => "int64",
            NpyDtype::F16 => "float16",
            NpyDtype::F32 => "float32",
            NpyDtype::F64 => "float64",
        }
    }

    fn from_descr(descr: &str) -> Option<Self> {
        // Checked: a descr starting with a multi-byte character has no byte 1
        // boundary (found by the npy_parse fuzz target; `split_at` panicked).
        let (order, code) = descr.split_at_checked(1)?;
        let d = match code {
            "u1" => NpyDtype::U8,
            "i1" => NpyDtype::I8,
            "u2" => NpyDtype::U16,
            "i2" => NpyDtype::I16,
            "u4" => NpyDtype::U32,
            "i4" => NpyDtype::I32,
            "u8" => NpyDtype::U64,
            "i8" => NpyDtype::I64,
            "f2" => NpyDtype::F16,
            "f4" => NpyDtype::F32,
            "f8" => NpyDtype::F64,
            _ => return None,
        };
        let ok = match order {
            "<" => true,
            "|" => d.itemsize() == 1,
            _ => false,
        };
        ok.then_some(d)
    }
}

/// A decoded array: raw little-endian element bytes in C order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyArray {
    pub dtype: NpyDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyError(pub String);

impl fmt::Display for NpyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NpyError {}

fn err<T>(msg: impl Into<String>) -> Result<T, NpyError> {
    Err(NpyError(msg.into()))
}

/// Parse a complete `.npy` file image.
pub fn parse_npy(buf: &[u8]) -> Result<NpyArray, NpyError> {
    if buf.len() < 10 || &buf[..6] != b"\x93NUMPY" {
        return err("not a .npy payload (bad magic)");
    }
    let major = buf[6];
    let (header_len, header_start): (usize, usize) = match major {
        1 => (usize::from(u16::from_le_bytes([buf[8], buf[9]])), 10),
        2 | 3 => {
            if buf.len() < 12 {
                return err("truncated .npy header");
            }
            let n = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
            (usize::try_from(n).map_err(|_| NpyError("header too large".into()))?, 12)
        }
        v => return err(format!("unsupported .npy format version {v}")),
    };
    let header_end = header_start
        .checked_add(header_len)
        .filter(|&e| e <= buf.len())
        .ok_or_else(|| NpyError("truncated .npy header".into()))?;
    let header =
        std::str::from_utf8(&buf[header_start..header_end]).map_err(|_| NpyError(".npy header is not UTF-8".into()))?;
    let descr = dict_value(header, "descr").ok_or_else(|| NpyError("no 'descr' in .npy header".into()))?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    let dtype = NpyDtype::from_descr(descr)
        .ok_or_else(|| NpyError(format!("unsupported .npy dtype {descr:?} (need little-endian int/float)")))?;
    let fortran = dict_value(header, "fortran_order").map(str::trim);
    if fortran != Some("False") {
        return err("only C-order .npy arrays are supported");
    }
    let shape_src = dict_value(header, "shape").ok_or_else(|| NpyError("no 'shape' in .npy header".into()))?;
    let shape = parse_shape(shape_src)?;
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| NpyError("array shape overflows".into()))?;
    let nbytes = count.checked_mul(dtype.itemsize()).ok_or_else(|| NpyError("array size overflows".into()))?;
    let data = &buf[header_end..];
    if data.len() != nbytes {
        return err(format!(
            ".npy data has {} bytes, shape {:?} of {} needs {nbytes}",
            data.len(),
            shape,
            dtype.name()
        ));
    }
    Ok(NpyArray { dtype, shape, data: data.to_vec() })
}

/// The source text of a value in the header's Python dict literal. The
/// header is a flat dict whose only nested value is the shape tuple.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat_sq = format!("'{key}'");
    let pat_dq = format!("\"{key}\"");
    let start =
        header.find(&pat_sq).map(|i| i + pat_sq.len()).or_else(|| header.find(&pat_dq).map(|i| i + pat_dq.len()))?;
    let rest = header[start..].trim_start().strip_prefix(':')?;
    let rest = rest.trim_start();
    if rest.starts_with('(') {
        let close = rest.find(')')?;
        return Some(&rest[..=close]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(&rest[..end])
}

fn parse_shape(src: &str) -> Result<Vec<usize>, NpyError> {
    let inner = src
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| NpyError(format!("bad .npy shape {src:?}")))?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>().map_err(|_| NpyError(format!("bad .npy shape {src:?}"))))
        .collect()
}

/// A `.npy` image (format 1.0) for tests of this and other modules.
#[cfg(test)]
pub(crate) fn npy_for_tests(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    tests::npy(descr, shape, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn parses_int32_3d() {
        let data: Vec<u8> = (0i32..12).flat_map(|v| v.to_le_bytes()).collect();
        let a = parse_npy(&npy("<i4", "(3, 2, 2)", &data)).unwrap();
        assert_eq!(a.dtype, NpyDtype::I32);
        assert_eq!(a.shape, vec![3, 2, 2]);
        assert_eq!(a.data, data);
    }

    #[test]
    fn parses_scalar_and_1d() {
        assert_eq!(parse_npy(&npy("|u1", "(4,)", &[1, 2, 3, 4])).unwrap().shape, vec![4]);
        assert_eq!(parse_npy(&npy("<f8", "()", &[0; 8])).unwrap().shape, Vec::<usize>::new());
    }

    #[test]
    fn rejects_bad_input() {
        assert!(parse_npy(b"garbage").is_err());
        assert!(parse_npy(&npy(">i4", "(1,)", &[0; 4])).is_err());
        assert!(parse_npy(&npy("<i4", "(2,)", &[0; 4])).is_err());
        assert!(parse_npy(&npy("<i4", "(99999999999, 99999999999, 99999999999)", &[])).is_err());
        let mut t = npy("<i4", "(1,)", &[0; 4]);
        t.truncate(12);
        assert!(parse_npy(&t).is_err());
        for descr in ["\u{65a}4", "\u{65a}", "", "<", "é<i4"] {
            assert!(parse_npy(&npy(descr, "(1,)", &[0; 4])).is_err(), "{descr:?}");
        }
    }
}
