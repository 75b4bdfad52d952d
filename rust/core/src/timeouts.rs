//! Timeouts arrive from Python as float seconds. `Duration::from_secs_f64`
//! panics on values it cannot represent (negative, NaN, above ~1.8e19), and
//! deadlines far in the future overflow `Instant` arithmetic in the libraries
//! underneath, so every timeout is converted here, once, with an error naming
//! the value instead of a panic.

use std::time::Duration;

/// Longest timeout accepted, in seconds (about 31 years): beyond any real
/// deadline, and far below where `Instant + Duration` can overflow.
pub const MAX_TIMEOUT_SECONDS: f64 = 1e9;

/// `secs` as a [`Duration`], if it is a positive number of seconds no larger
/// than [`MAX_TIMEOUT_SECONDS`]; otherwise a message naming `name` and the value.
pub fn timeout_from_secs(name: &str, secs: f64) -> Result<Duration, String> {
    if !(secs.is_finite() && secs > 0.0 && secs <= MAX_TIMEOUT_SECONDS) {
        return Err(format!("{name}={secs:?} must be a positive number of seconds, at most {MAX_TIMEOUT_SECONDS:e}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{name}={secs:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_float_is_a_duration_or_a_named_error() {
        assert_eq!(timeout_from_secs("t", 1.5), Ok(Duration::from_millis(1500)));
        assert!(timeout_from_secs("t", MAX_TIMEOUT_SECONDS).is_ok());
        assert!(timeout_from_secs("t", f64::MIN_POSITIVE).is_ok());
        for bad in [0.0, -0.0, -1.0, 1e20, f64::MAX, f64::INFINITY, f64::NEG_INFINITY, f64::NAN] {
            let e = timeout_from_secs("connect_timeout", bad).unwrap_err();
            assert!(e.starts_with(&format!("connect_timeout={bad:?}")), "{e}");
        }
    }
}
