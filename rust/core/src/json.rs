//! A small, strict, zero-allocation JSON reader for schema-directed decoding.
//!
//! The caller walks the document it expects (`object`, `array`, `string`,
//! `f64`, ...) and [`Reader::skip`] validates and skips whatever it does not
//! need. Every byte is checked against RFC 8259 (plus the `NaN`/`Infinity`
//! literals Python's `json` accepts), so a document accepted here is one
//! `json.loads` accepts too; errors carry the byte position.
//!
//! Numbers are parsed with the standard library's correctly rounded float
//! parser, so an f64 read here is bit-identical to Python's `float(text)`.

use std::borrow::Cow;
use std::fmt;

/// A JSON syntax or type error at byte `pos` of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    pub pos: usize,
    pub msg: Cow<'static, str>,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.msg, self.pos)
    }
}

impl std::error::Error for JsonError {}

pub type Result<T> = std::result::Result<T, JsonError>;

/// Nesting limit for skipped values: deep enough for any real payload, low
/// enough that a hostile `[[[[...` cannot exhaust the stack.
const MAX_DEPTH: u32 = 128;

/// Bytes that end the fast path of a string scan: '"', '\\', control bytes
/// and non-ASCII bytes.
static SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = b < 0x20 || b >= 0x80 || b == b'"' as usize || b == b'\\' as usize;
        b += 1;
    }
    t
};

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// Bit 7 of byte k is set when byte k of the 8 little-endian bytes in `w`
/// is special in a string ('"', '\\', a control byte or a non-ASCII byte).
/// Flags above the first special byte may be false (a borrow carries into
/// them), the lowest flag never is: `trailing_zeros / 8` is the position of
/// the first special byte.
#[inline]
fn special_mask(w: u64) -> u64 {
    let has_zero = |v: u64| v.wrapping_sub(LO) & !v & HI;
    let quote = has_zero(w ^ (LO * u64::from(b'"')));
    let backslash = has_zero(w ^ (LO * u64::from(b'\\')));
    let control = w.wrapping_sub(LO * 0x20) & !w & HI;
    quote | backslash | control | (w & HI)
}

const POW10_F64: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

/// Whether 8 little-endian bytes are all ASCII digits.
#[inline]
fn is_8_digits(v: u64) -> bool {
    (v & 0xF0F0_F0F0_F0F0_F0F0) == 0x3030_3030_3030_3030
        && (v.wrapping_add(0x0606_0606_0606_0606) & 0xF0F0_F0F0_F0F0_F0F0) == 0x3030_3030_3030_3030
}

/// Value of 8 ASCII digits (little-endian load, first digit most significant).
#[inline]
fn parse_8_digits(v: u64) -> u64 {
    let v = v.wrapping_sub(0x3030_3030_3030_3030);
    let v = (v.wrapping_mul(10) + (v >> 8)) & 0x00FF_00FF_00FF_00FF;
    let v = (v.wrapping_mul(100) + (v >> 16)) & 0x0000_FFFF_0000_FFFF;
    (v.wrapping_mul(10000) + (v >> 32)) & 0x0000_0000_FFFF_FFFF
}

/// Consume a run of digits at `*p`, accumulating up to 19 into `mant`.
/// Returns how many digits did not fit (they only shift the exponent).
#[inline]
fn digit_run(buf: &[u8], p: &mut usize, mant: &mut u64, digits: &mut u32) -> u32 {
    while *digits + 8 <= 19 {
        let Some(w) = buf.get(*p..*p + 8) else { break };
        let w = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        if !is_8_digits(w) {
            break;
        }
        *mant = *mant * 100_000_000 + parse_8_digits(w);
        *digits += 8;
        *p += 8;
    }
    let mut dropped = 0;
    while let Some(&d @ b'0'..=b'9') = buf.get(*p) {
        if *digits < 19 {
            *mant = *mant * 10 + u64::from(d - b'0');
            *digits += 1;
        } else {
            dropped += 1;
        }
        *p += 1;
    }
    dropped
}

/// `m / 10^k` correctly rounded (round half to even), for `0 < m < 2^64`,
/// `k <= 19`. Exact integer arithmetic: the 128-bit quotient of `m * 2^64`
/// by `10^k` has at least 54 significant bits whenever `m >= 10^k / 2^10`,
/// which leaves a rounding bit plus the remainder as sticky information.
/// Returns None when the quotient is too short to round this way.
fn div_pow10(m: u64, k: usize) -> Option<f64> {
    let d = 10u128.pow(k as u32);
    let n = u128::from(m) << 64;
    let q = n / d;
    let r = n % d;
    let bits = 128 - q.leading_zeros();
    if bits < 55 {
        return None;
    }
    let shift = bits - 53;
    let mut mant = (q >> shift) as u64;
    let round = (q >> (shift - 1)) & 1 == 1;
    let sticky = (q & ((1u128 << (shift - 1)) - 1)) != 0 || r != 0;
    let mut exp = shift as i32 - 64;
    if round && (sticky || mant & 1 == 1) {
        mant += 1;
        if mant == 1 << 53 {
            mant >>= 1;
            exp += 1;
        }
    }
    // mant < 2^53 is exact in f64, and scaling by a power of two is exact
    // for the normal range this path covers (values >= 10^-19).
    Some(mant as f64 * 2f64.powi(exp))
}

/// Cursor over one JSON document.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn err<T>(&self, msg: impl Into<Cow<'static, str>>) -> Result<T> {
        Err(JsonError { pos: self.pos, msg: msg.into() })
    }

    #[inline(always)]
    fn ws(&mut self) {
        // vLLM sends compact JSON: the common case is no whitespace at all.
        match self.buf.get(self.pos) {
            Some(&b) if b > b' ' => return,
            None => return,
            _ => {}
        }
        while let Some(&b) = self.buf.get(self.pos) {
            if matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    /// Next non-whitespace byte, not consumed.
    #[inline]
    pub fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.buf.get(self.pos).copied()
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else if self.pos >= self.buf.len() {
            self.err(format!("unexpected end of JSON, expected '{}'", c as char))
        } else {
            self.err(format!("expected '{}'", c as char))
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<()> {
        if self.buf[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            self.err("invalid literal")
        }
    }

    /// Consume `null` if it is next.
    #[inline]
    pub fn null(&mut self) -> Result<bool> {
        if self.peek() == Some(b'n') {
            self.literal(b"null")?;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// The whole buffer must be one value followed by whitespace only.
    pub fn end(&mut self) -> Result<()> {
        if self.peek().is_some() {
            return self.err("trailing characters after JSON value");
        }
        Ok(())
    }

    /// Iterate the members of an object; `f` must consume each value.
    pub fn object(&mut self, f: impl FnMut(&mut Self, &[u8]) -> Result<()>) -> Result<()> {
        self.expect(b'{')?;
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        self.members(None, f)
    }

    /// Continue an object whose opening and earlier members were consumed
    /// elsewhere: the reader is at the value of member `key`.
    pub fn object_resume(&mut self, key: &[u8], f: impl FnMut(&mut Self, &[u8]) -> Result<()>) -> Result<()> {
        self.members(Some(key), f)
    }

    fn members(&mut self, mut first: Option<&[u8]>, mut f: impl FnMut(&mut Self, &[u8]) -> Result<()>) -> Result<()> {
        loop {
            if let Some(key) = first.take() {
                f(self, key)?;
            } else {
                if self.peek() != Some(b'"') {
                    return self.err("expected an object key");
                }
                let key = self.string()?;
                self.expect(b':')?;
                f(self, key.as_bytes())?;
            }
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return self.err("expected ',' or '}' in object"),
            }
        }
    }

    /// The document being read.
    pub fn buf(&self) -> &'a [u8] {
        self.buf
    }

    /// Move to byte `pos` (clamped to the end).
    pub fn set_pos(&mut self, pos: usize) {
        self.pos = pos.min(self.buf.len());
    }

    /// Iterate the elements of an array; `f` must consume each element.
    pub fn array(&mut self, mut f: impl FnMut(&mut Self) -> Result<()>) -> Result<()> {
        self.expect(b'[')?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            f(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return self.err("expected ',' or ']' in array"),
            }
        }
    }

    /// A string, borrowed when it contains no escapes.
    pub fn string(&mut self) -> Result<Cow<'a, str>> {
        self.expect(b'"')?;
        let start = self.pos;
        let buf = self.buf;
        // Fast path: scan 8 bytes at a time for '"', '\\', control bytes and
        // non-ASCII bytes; only strings with non-ASCII bytes pay for UTF-8
        // validation.
        let mut i = start;
        let mut ascii = true;
        loop {
            // Eight bytes at a time; the first special byte ends the run.
            while let Some(w) = buf.get(i..i + 8) {
                let m = special_mask(u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]));
                if m != 0 {
                    i += (m.trailing_zeros() / 8) as usize;
                    break;
                }
                i += 8;
            }
            // The last few bytes of the buffer (a no-op after a break above).
            while i < buf.len() && !SPECIAL[usize::from(buf[i])] {
                i += 1;
            }
            let Some(&b) = buf.get(i) else {
                self.pos = buf.len();
                return self.err("unterminated string");
            };
            match b {
                b'"' => {
                    let raw = &buf[start..i];
                    let s = if ascii {
                        debug_assert!(raw.is_ascii());
                        // SAFETY: every byte of `raw` was checked to be < 0x80
                        // (`ascii` stays true only then), and ASCII is UTF-8.
                        unsafe { std::str::from_utf8_unchecked(raw) }
                    } else {
                        std::str::from_utf8(raw).map_err(|e| JsonError {
                            pos: start + e.valid_up_to(),
                            msg: "invalid UTF-8 in string".into(),
                        })?
                    };
                    self.pos = i + 1;
                    return Ok(Cow::Borrowed(s));
                }
                b'\\' => break,
                0..=0x1f => {
                    self.pos = i;
                    return self.err("control character in string");
                }
                0x80.. => {
                    ascii = false;
                    i += 1;
                }
                _ => i += 1,
            }
        }
        // An escape: copy what came before it and decode the rest.
        let mut out: Vec<u8> = buf[start..i].to_vec();
        let mut p = i;
        loop {
            let Some(&b) = buf.get(p) else {
                self.pos = p;
                return self.err("unterminated string");
            };
            match b {
                b'"' => {
                    p += 1;
                    break;
                }
                b'\\' => {
                    let Some(&e) = buf.get(p + 1) else {
                        self.pos = p;
                        return self.err("unterminated escape");
                    };
                    p += 2;
                    match e {
                        b'"' => out.push(b'"'),
                        b'\\' => out.push(b'\\'),
                        b'/' => out.push(b'/'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            self.pos = p;
                            let c = self.unicode_escape()?;
                            p = self.pos;
                            let mut tmp = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
                        }
                        _ => {
                            self.pos = p - 1;
                            return self.err("invalid escape");
                        }
                    }
                }
                0..=0x1f => {
                    self.pos = p;
                    return self.err("control character in string");
                }
                _ => {
                    out.push(b);
                    p += 1;
                }
            }
        }
        let s = String::from_utf8(out).map_err(|e| JsonError {
            pos: start + e.utf8_error().valid_up_to(),
            msg: "invalid UTF-8 in string".into(),
        })?;
        self.pos = p;
        Ok(Cow::Owned(s))
    }

    fn hex4(&mut self) -> Result<u32> {
        let Some(h) = self.buf.get(self.pos..self.pos + 4) else {
            return self.err("truncated \\u escape");
        };
        let mut v = 0u32;
        for &c in h {
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return self.err("invalid \\u escape"),
            };
            v = v * 16 + u32::from(d);
        }
        self.pos += 4;
        Ok(v)
    }

    fn unicode_escape(&mut self) -> Result<char> {
        let hi = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&hi) {
            if self.buf.get(self.pos..self.pos + 2) != Some(b"\\u") {
                return self.err("unpaired surrogate in \\u escape");
            }
            self.pos += 2;
            let lo = self.hex4()?;
            if !(0xDC00..0xE000).contains(&lo) {
                return self.err("unpaired surrogate in \\u escape");
            }
            0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
        } else {
            hi
        };
        char::from_u32(code).map_or_else(|| self.err("unpaired surrogate in \\u escape"), Ok)
    }

    /// The text of a number token, validated against the JSON grammar.
    fn number_text(&mut self) -> Result<&'a str> {
        self.ws();
        let buf = self.buf;
        let start = self.pos;
        let mut p = start;
        if buf.get(p) == Some(&b'-') {
            p += 1;
        }
        match buf.get(p) {
            Some(b'0') => p += 1,
            Some(b'1'..=b'9') => {
                while matches!(buf.get(p), Some(b'0'..=b'9')) {
                    p += 1;
                }
            }
            _ => return self.err("expected a number"),
        }
        if buf.get(p) == Some(&b'.') {
            p += 1;
            if !matches!(buf.get(p), Some(b'0'..=b'9')) {
                self.pos = p;
                return self.err("invalid number");
            }
            while matches!(buf.get(p), Some(b'0'..=b'9')) {
                p += 1;
            }
        }
        if matches!(buf.get(p), Some(b'e' | b'E')) {
            p += 1;
            if matches!(buf.get(p), Some(b'+' | b'-')) {
                p += 1;
            }
            if !matches!(buf.get(p), Some(b'0'..=b'9')) {
                self.pos = p;
                return self.err("invalid number");
            }
            while matches!(buf.get(p), Some(b'0'..=b'9')) {
                p += 1;
            }
        }
        self.pos = p;
        // The grammar above admits ASCII only.
        std::str::from_utf8(&buf[start..p]).map_or_else(|_| self.err("invalid number"), Ok)
    }

    /// A number as f64 (correctly rounded), also accepting Python's `NaN`,
    /// `Infinity` and `-Infinity`.
    pub fn f64(&mut self) -> Result<f64> {
        match self.peek() {
            Some(b'N') => {
                self.literal(b"NaN")?;
                return Ok(f64::NAN);
            }
            Some(b'I') => {
                self.literal(b"Infinity")?;
                return Ok(f64::INFINITY);
            }
            Some(b'-') if self.buf.get(self.pos + 1) == Some(&b'I') => {
                self.literal(b"-Infinity")?;
                return Ok(f64::NEG_INFINITY);
            }
            _ => {}
        }
        self.number_f64()
    }

    /// Scan a number and compute its value in one pass, correctly rounded:
    /// - mantissas up to 2^53 with decimal exponents within +-22: Clinger's
    ///   exact fast path (one IEEE multiply or divide);
    /// - mantissas up to 19 digits divided by 10^k, k <= 19 (vLLM's 17-digit
    ///   logprobs): exact 128-bit division with round-half-even by hand;
    /// - anything else: the standard library's correctly rounded parser.
    fn number_f64(&mut self) -> Result<f64> {
        let buf = self.buf;
        let start = self.pos;
        let mut p = start;
        let neg = buf.get(p) == Some(&b'-');
        p += usize::from(neg);
        let mut mant: u64 = 0;
        // Mantissa digits consumed (leading zeros included); <= 19 keeps `mant` exact.
        let mut digits = 0u32;
        let mut exp10: i64 = 0;
        let mut exact = true;
        match buf.get(p) {
            Some(b'0') => p += 1,
            Some(b'1'..=b'9') => {
                let n = digit_run(buf, &mut p, &mut mant, &mut digits);
                if n > 0 {
                    exact = false;
                }
            }
            _ => return self.err("expected a number"),
        }
        if buf.get(p) == Some(&b'.') {
            p += 1;
            if !matches!(buf.get(p), Some(b'0'..=b'9')) {
                self.pos = p;
                return self.err("invalid number");
            }
            let before = digits;
            let dropped = digit_run(buf, &mut p, &mut mant, &mut digits);
            exp10 -= i64::from(digits - before);
            if dropped > 0 {
                exact = false;
            }
        }
        if matches!(buf.get(p), Some(b'e' | b'E')) {
            p += 1;
            let eneg = buf.get(p) == Some(&b'-');
            if matches!(buf.get(p), Some(b'+' | b'-')) {
                p += 1;
            }
            if !matches!(buf.get(p), Some(b'0'..=b'9')) {
                self.pos = p;
                return self.err("invalid number");
            }
            let mut e: i64 = 0;
            while let Some(&d @ b'0'..=b'9') = buf.get(p) {
                e = (e * 10 + i64::from(d - b'0')).min(1 << 40);
                p += 1;
            }
            exp10 += if eneg { -e } else { e };
        }
        self.pos = p;
        if exact {
            if mant <= (1u64 << 53) && (-22..=22).contains(&exp10) {
                let m = mant as f64;
                let v = if exp10 >= 0 { m * POW10_F64[exp10 as usize] } else { m / POW10_F64[(-exp10) as usize] };
                return Ok(if neg { -v } else { v });
            }
            if mant != 0 && (-19..0).contains(&exp10) {
                if let Some(v) = div_pow10(mant, (-exp10) as usize) {
                    return Ok(if neg { -v } else { v });
                }
            }
        }
        // The grammar above admits ASCII only.
        std::str::from_utf8(&buf[start..p])
            .ok()
            .and_then(|t| t.parse::<f64>().ok())
            .map_or_else(|| Err(JsonError { pos: start, msg: "invalid number".into() }), Ok)
    }

    /// A number or null (null as NaN).
    pub fn f64_or_null(&mut self) -> Result<f64> {
        if self.null()? {
            Ok(f64::NAN)
        } else {
            self.f64()
        }
    }

    /// An integer (no fraction or exponent) in i64 range.
    pub fn i64(&mut self) -> Result<i64> {
        self.ws();
        let start = self.pos;
        // Fast path: a plain integer of up to 18 digits (token ids, ranks,
        // indices), accumulated while scanning instead of re-parsed.
        let buf = self.buf;
        let mut p = start;
        let neg = buf.get(p) == Some(&b'-');
        p += usize::from(neg);
        let digits_start = p;
        let mut v: i64 = 0;
        while let Some(&d @ b'0'..=b'9') = buf.get(p) {
            if p - digits_start == 18 {
                break;
            }
            v = v * 10 + i64::from(d - b'0');
            p += 1;
        }
        let n = p - digits_start;
        let leading_zero = n > 1 && buf[digits_start] == b'0';
        if n > 0 && !leading_zero && !matches!(buf.get(p), Some(b'0'..=b'9' | b'.' | b'e' | b'E')) {
            self.pos = p;
            return Ok(if neg { -v } else { v });
        }
        let text = self.number_text()?;
        text.parse::<i64>().map_err(|_| JsonError {
            pos: start,
            msg: if text.contains(['.', 'e', 'E']) {
                "expected an integer".into()
            } else {
                "integer out of range".into()
            },
        })
    }

    /// A token id: an integer in 0..=u32::MAX.
    pub fn u32(&mut self) -> Result<u32> {
        let start = self.pos;
        let v = self.i64()?;
        u32::try_from(v).map_err(|_| JsonError { pos: start, msg: format!("token id {v} out of range").into() })
    }

    pub fn bool(&mut self) -> Result<bool> {
        match self.peek() {
            Some(b't') => self.literal(b"true").map(|_| true),
            Some(b'f') => self.literal(b"false").map(|_| false),
            _ => self.err("expected a boolean"),
        }
    }

    /// Validate and skip any value.
    pub fn skip(&mut self) -> Result<()> {
        self.skip_depth(0)
    }

    fn skip_depth(&mut self, depth: u32) -> Result<()> {
        if depth > MAX_DEPTH {
            return self.err("JSON nested too deeply");
        }
        match self.peek() {
            Some(b'{') => self.object(|r, _| r.skip_depth(depth + 1)),
            Some(b'[') => self.array(|r| r.skip_depth(depth + 1)),
            Some(b'"') => self.string().map(drop),
            Some(b't' | b'f') => self.bool().map(drop),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9' | b'N' | b'I') => self.f64().map(drop),
            Some(_) => self.err("unexpected character"),
            None => self.err("unexpected end of JSON"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_numbers_and_escapes() {
        let mut r = Reader::new(br#" "a\"b\u00e9\ud83d\ude00\n" "#);
        assert_eq!(r.string().unwrap(), "a\"bé😀\n");
        r.end().unwrap();
        let mut r = Reader::new(b"[-6.627107620239258, 0, 1e-3, -9999.0, NaN, -Infinity, 12]");
        let mut v = vec![];
        r.array(|r| r.f64().map(|x| v.push(x))).unwrap();
        assert_eq!(v[0], -6.627107620239258);
        assert_eq!(v[3], -9999.0);
        assert!(v[4].is_nan());
        assert_eq!(v[5], f64::NEG_INFINITY);
        assert_eq!(v[6], 12.0);
    }

    #[test]
    fn objects_and_skip() {
        let doc = br#"{"a": {"x": [1, {"y": null}], "z": true}, "b": "s", "c": [ ]}"#;
        let mut r = Reader::new(doc);
        let mut keys = vec![];
        r.object(|r, k| {
            keys.push(String::from_utf8(k.to_vec()).unwrap());
            r.skip()
        })
        .unwrap();
        r.end().unwrap();
        assert_eq!(keys, ["a", "b", "c"]);
    }

    #[test]
    fn rejects_invalid_documents() {
        for bad in [
            &b"{"[..],
            b"{\"a\" 1}",
            b"[1,]",
            b"[01]",
            b"[1.]",
            b"[.5]",
            b"\"\\x\"",
            b"\"a\x01\"",
            b"\"\xff\"",
            b"\"\\ud800\"",
            b"tru",
            b"{\"a\":1,}",
            b"[1 2]",
        ] {
            let mut r = Reader::new(bad);
            assert!(r.skip().and_then(|_| r.end()).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = [b'['; 1000];
        assert!(Reader::new(&deep).skip().is_err());
    }

    #[test]
    fn integers_are_strict() {
        assert_eq!(Reader::new(b"4294967295").u32().unwrap(), u32::MAX);
        assert!(Reader::new(b"4294967296").u32().is_err());
        assert!(Reader::new(b"-1").u32().is_err());
        assert!(Reader::new(b"1.5").u32().is_err());
        assert!(Reader::new(b"99999999999999999999999").i64().is_err());
        for (text, want) in [
            (&b"0"[..], 0),
            (b"-0", 0),
            (b"-45", -45),
            (b"999999999999999999", 999_999_999_999_999_999),
            (b"9223372036854775807", i64::MAX),
            (b"-9223372036854775808", i64::MIN),
        ] {
            let mut r = Reader::new(text);
            assert_eq!(r.i64().unwrap(), want, "{}", String::from_utf8_lossy(text));
            r.end().unwrap();
        }
        assert!(Reader::new(b"9223372036854775808").i64().is_err());
        assert!(Reader::new(b"2e3").i64().is_err());
        assert!(Reader::new(b"-").i64().is_err());
        let mut r = Reader::new(b"01");
        assert!(r.i64().and_then(|_| r.end()).is_err(), "a leading zero is not an integer");
    }

    /// JSON text of `s`: escapes for '"', '\\' and control bytes, the rest raw.
    fn json_quote(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    proptest::proptest! {
        #[test]
        fn strings_round_trip(s in "(\\PC|[\"\\\\\\x00-\\x1f]|[a-z ]{0,20}){0,40}") {
            // Every position of every kind of special byte, in and across 8-byte words.
            let text = json_quote(&s);
            let mut r = Reader::new(text.as_bytes());
            proptest::prop_assert_eq!(r.string().unwrap(), s.as_str());
            proptest::prop_assert!(r.end().is_ok());
            // Cut short anywhere: an error, never a wrong string or a panic.
            for cut in 0..text.len() {
                proptest::prop_assert!(Reader::new(&text.as_bytes()[..cut]).string().is_err());
            }
        }

        #[test]
        fn i64_matches_std(x in proptest::num::i64::ANY) {
            let text = x.to_string();
            let mut r = Reader::new(text.as_bytes());
            proptest::prop_assert_eq!(r.i64().unwrap(), x);
            proptest::prop_assert!(r.end().is_ok());
        }
    }

    proptest::proptest! {
        #[test]
        fn f64_matches_std(x in proptest::num::f64::ANY) {
            if x.is_finite() {
                for text in [format!("{x}"), format!("{x:e}"), format!("{x:.3}"), format!("{:.17}", x)] {
                    let ours = Reader::new(text.as_bytes()).f64().unwrap();
                    let std: f64 = text.parse().unwrap();
                    proptest::prop_assert_eq!(ours.to_bits(), std.to_bits(), "{}", text);
                }
            }
        }

        #[test]
        fn f64_matches_std_on_f32_reprs(x in proptest::num::f32::NORMAL) {
            // vLLM's logprobs: f32 values printed as Python floats (shortest f64 repr).
            let text = format!("{:?}", f64::from(x));
            let ours = Reader::new(text.as_bytes()).f64().unwrap();
            proptest::prop_assert_eq!(ours.to_bits(), f64::from(x).to_bits(), "{}", text);
        }

        #[test]
        fn f64_matches_std_on_long_decimals(int in 0u64..1000, frac in 0u64..100_000_000_000_000_000u64, w in 1usize..20, neg: bool) {
            let text = format!("{}{}.{:0w$}", if neg { "-" } else { "" }, int, frac % 10u64.pow(w as u32), w = w);
            let ours = Reader::new(text.as_bytes()).f64().unwrap();
            let std: f64 = text.parse().unwrap();
            proptest::prop_assert_eq!(ours.to_bits(), std.to_bits(), "{}", text);
        }

        #[test]
        fn f64_matches_std_on_decimal_strings(m in 0u64..10_000_000_000_000_000_000u64, e in -30i32..30, neg: bool) {
            let text = format!("{}{}e{}", if neg { "-" } else { "" }, m, e);
            let ours = Reader::new(text.as_bytes()).f64().unwrap();
            let std: f64 = text.parse().unwrap();
            proptest::prop_assert_eq!(ours.to_bits(), std.to_bits(), "{}", text);
        }
    }
}
