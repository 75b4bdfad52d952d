//! AIMD (additive increase, multiplicative decrease) of a concurrency window
//! on the server's queueing signal.
//!
//! Signals, best first:
//! - vLLM's per-request `metrics.queue_time_ms` (`--enable-per-request-metrics`):
//!   time from queued to scheduled in the engine;
//! - client-measured time to first token, minus a running baseline (the
//!   smallest of the last 256 TTFTs, i.e. prefill without queueing), when
//!   the server sends no metrics;
//! - congestion: HTTP 429/503 or a transport error, which shrink at once.
//!
//! Queue samples are averaged per interval (every `interval` samples, or at
//! [`Aimd::step`]) into an EMA. Above the target the window halves; below, it
//! grows by `target / ema`, at most `max_increase` per interval. The window
//! always stays within `[min_window, max_window]`. Time is passed in by the
//! caller (seconds, any monotonic origin), so the machine is deterministic and
//! testable with a simulated clock.

use std::collections::VecDeque;

/// Tuning of the controller.
#[derive(Debug, Clone, PartialEq)]
pub struct AimdConfig {
    pub initial_window: f64,
    pub min_window: f64,
    pub max_window: f64,
    /// Target queueing delay in seconds.
    pub target: f64,
    /// Samples per adjustment.
    pub interval: u32,
    /// EMA weight of the newest interval.
    pub alpha: f64,
    /// Largest additive increase per interval.
    pub max_increase: f64,
    /// Multiplicative decrease on an over-target interval or a congestion signal.
    pub decrease: f64,
    /// Decrease when a request keeps failing (retry attempt >= 3).
    pub severe_decrease: f64,
    /// Congestion signals within this many seconds of a shrink count as one.
    pub cooldown: f64,
}

impl Default for AimdConfig {
    fn default() -> Self {
        AimdConfig {
            initial_window: 16.0,
            min_window: 1.0,
            max_window: 256.0,
            target: 0.5,
            interval: 32,
            alpha: 0.3,
            max_increase: 4.0,
            decrease: 0.5,
            severe_decrease: 0.25,
            cooldown: 1.0,
        }
    }
}

impl AimdConfig {
    /// Check the configuration; the error names the offending value.
    pub fn validate(&self) -> Result<(), String> {
        let finite = [self.initial_window, self.min_window, self.max_window, self.target, self.alpha];
        if finite.iter().any(|v| !v.is_finite()) {
            return Err("window sizes, target and alpha must be finite numbers".into());
        }
        if self.min_window < 1.0 {
            return Err(format!("min_window={} must be >= 1", self.min_window));
        }
        if self.max_window < self.min_window {
            return Err(format!("max_window={} is below min_window={}", self.max_window, self.min_window));
        }
        if !(self.min_window..=self.max_window).contains(&self.initial_window) {
            return Err(format!(
                "initial_window={} must lie in [min_window={}, max_window={}]",
                self.initial_window, self.min_window, self.max_window
            ));
        }
        if self.target <= 0.0 {
            return Err(format!("prefill_queue_target={} must be positive (seconds)", self.target));
        }
        if self.interval == 0 {
            return Err("interval must be at least 1".into());
        }
        if !(0.0 < self.alpha && self.alpha <= 1.0) {
            return Err(format!("alpha={} must lie in (0, 1]", self.alpha));
        }
        let in_unit = |f: f64| 0.0 < f && f < 1.0;
        if !in_unit(self.decrease) || !in_unit(self.severe_decrease) {
            return Err("decrease factors must lie in (0, 1)".into());
        }
        Ok(())
    }
}

/// What a finished request tells the controller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Signal {
    /// Server-reported queue time, seconds.
    QueueTime(f64),
    /// Client-measured time to first token, seconds (fallback signal).
    FirstToken(f64),
    /// 429/503/transport failure of a request on its `retry_attempt`-th try.
    Congestion { retry_attempt: u32 },
}

/// Counters since the last [`Aimd::step`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepStats {
    pub window: usize,
    pub window_before: usize,
    pub avg_queue: Option<f64>,
    pub ema_queue: Option<f64>,
    pub queue_samples: u64,
    pub ttft_samples: u64,
    pub congestion_events: u64,
    pub shrinks: u64,
    pub grows: u64,
}

#[derive(Debug, Clone)]
pub struct Aimd {
    cfg: AimdConfig,
    window: f64,
    ema: Option<f64>,
    interval_sum: f64,
    interval_n: u32,
    last_shrink: Option<f64>,
    ttft_recent: VecDeque<f64>,
    step: StepStats,
    step_sum: f64,
    window_at_step: usize,
}

/// TTFT samples kept for the no-queueing baseline.
const BASELINE_SAMPLES: usize = 256;

impl Aimd {
    pub fn new(cfg: AimdConfig) -> Result<Self, String> {
        cfg.validate()?;
        let w = cfg.initial_window;
        Ok(Aimd {
            window: w,
            ema: None,
            interval_sum: 0.0,
            interval_n: 0,
            last_shrink: None,
            ttft_recent: VecDeque::with_capacity(BASELINE_SAMPLES),
            step: StepStats::default(),
            step_sum: 0.0,
            window_at_step: w as usize,
            cfg,
        })
    }

    pub fn config(&self) -> &AimdConfig {
        &self.cfg
    }

    /// The number of requests that may be in flight.
    pub fn window(&self) -> usize {
        self.window.floor().max(self.cfg.min_window) as usize
    }

    /// Feed one signal observed at time `now` (seconds). Returns whether the
    /// window changed.
    pub fn observe(&mut self, signal: Signal, now: f64) -> bool {
        let before = self.window();
        match signal {
            Signal::QueueTime(q) if q.is_finite() && q >= 0.0 => {
                self.step.queue_samples += 1;
                self.push_sample(q);
            }
            Signal::FirstToken(t) if t.is_finite() && t >= 0.0 => {
                self.step.ttft_samples += 1;
                if self.ttft_recent.len() == BASELINE_SAMPLES {
                    self.ttft_recent.pop_front();
                }
                self.ttft_recent.push_back(t);
                let baseline = self.ttft_recent.iter().copied().fold(f64::INFINITY, f64::min);
                self.push_sample((t - baseline).max(0.0));
            }
            Signal::Congestion { retry_attempt } => {
                self.step.congestion_events += 1;
                let recent = self.last_shrink.is_some_and(|t| now - t < self.cfg.cooldown);
                if !recent {
                    let f = if retry_attempt >= 3 { self.cfg.severe_decrease } else { self.cfg.decrease };
                    self.shrink(f, now);
                }
            }
            _ => {}
        }
        if self.interval_n >= self.cfg.interval {
            self.adjust(now);
        }
        self.window() != before
    }

    fn push_sample(&mut self, q: f64) {
        self.interval_sum += q;
        self.interval_n += 1;
        self.step_sum += q;
    }

    fn shrink(&mut self, factor: f64, now: f64) {
        self.window = (self.window * factor).max(self.cfg.min_window);
        self.last_shrink = Some(now);
        self.step.shrinks += 1;
    }

    /// Apply the samples of the current interval (no-op without samples).
    pub fn adjust(&mut self, now: f64) {
        if self.interval_n == 0 {
            return;
        }
        let avg = self.interval_sum / f64::from(self.interval_n);
        self.interval_sum = 0.0;
        self.interval_n = 0;
        let ema = match self.ema {
            None => avg,
            Some(prev) => self.cfg.alpha * avg + (1.0 - self.cfg.alpha) * prev,
        };
        self.ema = Some(ema);
        if ema > self.cfg.target {
            self.shrink(self.cfg.decrease, now);
        } else {
            let inc = (self.cfg.target / ema.max(1e-3)).min(self.cfg.max_increase);
            self.window = (self.window + inc).min(self.cfg.max_window);
            self.step.grows += 1;
        }
    }

    /// End of a training step: apply pending samples and return (and reset)
    /// the step's counters.
    pub fn step(&mut self, now: f64) -> StepStats {
        self.adjust(now);
        let mut out = std::mem::take(&mut self.step);
        let n = out.queue_samples + out.ttft_samples;
        out.avg_queue = (n > 0).then(|| self.step_sum / n as f64);
        out.ema_queue = self.ema;
        out.window = self.window();
        out.window_before = self.window_at_step;
        self.window_at_step = out.window;
        self.step_sum = 0.0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn aimd() -> Aimd {
        Aimd::new(AimdConfig { interval: 4, ..Default::default() }).unwrap()
    }

    #[test]
    fn grows_below_target_and_halves_above() {
        let mut a = aimd();
        for i in 0..4 {
            a.observe(Signal::QueueTime(0.05), f64::from(i));
        }
        assert_eq!(a.window(), 20); // 16 + min(0.5/0.05, 4)
        for i in 0..4 {
            a.observe(Signal::QueueTime(5.0), 10.0 + f64::from(i));
        }
        // EMA 0.3*5 + 0.7*0.05 > 0.5: halve.
        assert_eq!(a.window(), 10);
    }

    #[test]
    fn congestion_shrinks_once_per_cooldown() {
        let mut a = aimd();
        assert!(a.observe(Signal::Congestion { retry_attempt: 0 }, 0.0));
        assert_eq!(a.window(), 8);
        assert!(!a.observe(Signal::Congestion { retry_attempt: 0 }, 0.5));
        assert!(a.observe(Signal::Congestion { retry_attempt: 3 }, 2.0));
        assert_eq!(a.window(), 2);
    }

    #[test]
    fn ttft_fallback_uses_the_excess_over_baseline() {
        let mut a = aimd();
        for (i, t) in [0.2, 0.21, 0.2, 0.22].iter().enumerate() {
            a.observe(Signal::FirstToken(*t), i as f64);
        }
        assert!(a.window() > 16, "small excess grows the window");
        for i in 0..8 {
            a.observe(Signal::FirstToken(3.0), 10.0 + f64::from(i));
        }
        assert!(a.window() < 16, "a queue building up shrinks it");
    }

    #[test]
    fn config_errors_name_the_value() {
        let e = Aimd::new(AimdConfig { initial_window: 500.0, ..Default::default() }).unwrap_err();
        assert!(e.contains("initial_window=500"));
        assert!(Aimd::new(AimdConfig { target: 0.0, ..Default::default() }).is_err());
        assert!(Aimd::new(AimdConfig { min_window: 0.0, ..Default::default() }).is_err());
    }

    #[test]
    fn step_reports_and_resets() {
        let mut a = aimd();
        a.observe(Signal::QueueTime(0.1), 0.0);
        a.observe(Signal::QueueTime(0.3), 0.1);
        let s = a.step(1.0);
        assert_eq!(s.queue_samples, 2);
        assert!((s.avg_queue.unwrap() - 0.2).abs() < 1e-12);
        assert_eq!(s.window_before, 16);
        assert!(s.window > 16);
        assert_eq!(a.step(2.0).queue_samples, 0);
    }

    fn signal() -> impl Strategy<Value = Signal> {
        prop_oneof![
            (0.0f64..10.0).prop_map(Signal::QueueTime),
            (0.0f64..10.0).prop_map(Signal::FirstToken),
            (0u32..5).prop_map(|r| Signal::Congestion { retry_attempt: r }),
        ]
    }

    proptest! {
        #[test]
        fn window_stays_in_bounds(
            min in 1.0f64..8.0, span in 0.0f64..300.0, start in 0.0f64..1.0,
            signals in proptest::collection::vec((signal(), 0.0f64..2.0), 0..400),
        ) {
            let cfg = AimdConfig {
                min_window: min, max_window: min + span, initial_window: min + span * start, interval: 3,
                ..Default::default()
            };
            let mut a = Aimd::new(cfg).unwrap();
            let mut now = 0.0;
            for (s, dt) in signals {
                now += dt;
                a.observe(s, now);
                prop_assert!(a.window() >= min.floor() as usize);
                prop_assert!(a.window <= min + span + 1e-9);
            }
        }

        #[test]
        fn reactions_are_monotone(q in 0.0f64..10.0, n in 1u32..50) {
            let mut a = Aimd::new(AimdConfig { interval: 1, ..Default::default() }).unwrap();
            let before = a.window;
            for i in 0..n {
                a.observe(Signal::QueueTime(q), f64::from(i));
            }
            if q > 0.5 { prop_assert!(a.window <= before); } else { prop_assert!(a.window >= before); }
            let w = a.window;
            a.observe(Signal::Congestion { retry_attempt: 0 }, 1e6);
            prop_assert!(a.window <= w);
        }
    }
}
