//! AIMD (additive increase, multiplicative decrease) of a concurrency window
//! on the server's queueing signal.
//!
//! Signals, best first:
//! - vLLM's per-request `metrics.queue_time_ms` (`--enable-per-request-metrics`):
//!   time from queued to scheduled in the engine;
//! - client-measured time to first token, minus what prefilling a prompt of
//!   that length takes without queueing (see [`Signal::FirstToken`]), when
//!   the server sends no queue time (the generate endpoint);
//! - congestion: HTTP 429/503 or a transport error, which shrink at once.
//!
//! Queue samples are averaged per interval (every `interval` samples, or at
//! [`Aimd::step`]) into an EMA. Above the target the window is multiplied by
//! `decrease`; below, it grows by `additive_increase * min(target / ema,
//! headroom_cap)`. The window always stays within `[min_window, max_window]`.
//! These are the Fireworks SDK's rules and defaults. Time is passed in by the
//! caller (seconds, any monotonic origin), so the machine is deterministic and
//! testable with a simulated clock.

use std::collections::VecDeque;

/// Tuning of the controller.
#[derive(Debug, Clone, PartialEq)]
pub struct AimdConfig {
    /// Clamped into `[min_window, max_window]`.
    pub initial_window: f64,
    pub min_window: f64,
    pub max_window: f64,
    /// Target queueing delay in seconds.
    pub target: f64,
    /// Samples per adjustment; 0 adjusts only at [`Aimd::step`].
    pub interval: u32,
    /// EMA weight of the newest interval.
    pub alpha: f64,
    /// Window added per interval below target, times the headroom factor.
    pub additive_increase: f64,
    /// Largest headroom factor `target / ema` used for an increase.
    pub headroom_cap: f64,
    /// Multiplicative decrease on an over-target interval or a congestion signal.
    pub decrease: f64,
    /// Decrease when a request keeps failing (1-based retry attempt >= 3).
    pub severe_decrease: f64,
    /// Congestion signals within this many seconds of a shrink count as one.
    pub cooldown: f64,
}

impl Default for AimdConfig {
    fn default() -> Self {
        AimdConfig {
            initial_window: 8.0,
            min_window: 1.0,
            max_window: 256.0,
            target: 0.5,
            interval: 32,
            alpha: 0.3,
            additive_increase: 1.0,
            headroom_cap: 4.0,
            decrease: 0.5,
            severe_decrease: 0.25,
            cooldown: 1.0,
        }
    }
}

impl AimdConfig {
    /// Check the configuration; the error names the offending value.
    pub fn validate(&self) -> Result<(), String> {
        let finite = [
            ("initial_window", self.initial_window),
            ("min_window", self.min_window),
            ("max_window", self.max_window),
            ("prefill_queue_target", self.target),
            ("ema_alpha", self.alpha),
            ("additive_increase", self.additive_increase),
            ("multiplicative_decrease", self.decrease),
            ("shrink_cooldown_s", self.cooldown),
        ];
        if let Some((name, v)) = finite.iter().find(|(_, v)| !v.is_finite()) {
            return Err(format!("{name}={v} must be a finite number"));
        }
        if self.min_window < 1.0 {
            return Err(format!("min_window={} must be >= 1 (a window of 0 admits nothing)", self.min_window));
        }
        if self.max_window < self.min_window {
            return Err(format!("max_window={} is below min_window={}", self.max_window, self.min_window));
        }
        if self.target <= 0.0 {
            return Err(format!("prefill_queue_target={} must be positive (seconds)", self.target));
        }
        if !(0.0 < self.alpha && self.alpha <= 1.0) {
            return Err(format!("ema_alpha={} must lie in (0, 1]", self.alpha));
        }
        if self.additive_increase <= 0.0 {
            return Err(format!("additive_increase={} must be positive", self.additive_increase));
        }
        if !(self.headroom_cap.is_finite() && self.headroom_cap >= 1.0) {
            return Err(format!("headroom_cap={} must be a finite number >= 1", self.headroom_cap));
        }
        let in_unit = |f: f64| 0.0 < f && f < 1.0;
        if !in_unit(self.decrease) {
            return Err(format!("multiplicative_decrease={} must lie in (0, 1)", self.decrease));
        }
        if !in_unit(self.severe_decrease) {
            return Err(format!("severe_decrease={} must lie in (0, 1)", self.severe_decrease));
        }
        if self.cooldown < 0.0 {
            return Err(format!("shrink_cooldown_s={} must be >= 0", self.cooldown));
        }
        Ok(())
    }
}

/// What a finished request tells the controller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Signal {
    /// Server-reported queue time, seconds.
    QueueTime(f64),
    /// Client-measured time to first token, seconds, of a request whose
    /// prompt needed `prefill_tokens` tokens prefilled (prompt minus cached).
    ///
    /// The queueing estimate is the excess over the fastest recent first
    /// token *scaled to this prompt's length*: a recent sample that took
    /// `t_j` for `n_j` tokens bounds an unqueued prefill of `n` tokens by
    /// `t_j * max(1, n / n_j)` (prefill time grows with length, at most
    /// linearly plus a fixed cost that scaling only overstates). A long
    /// prompt is therefore not mistaken for queueing, and the excess never
    /// overstates the queue.
    FirstToken { seconds: f64, prefill_tokens: u64 },
    /// 429/503/transport failure of a request on its `retry_attempt`-th try
    /// (1-based).
    Congestion { retry_attempt: u32 },
}

/// What [`Aimd::step`] reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepStats {
    /// The window before this step's adjustment.
    pub window_before: usize,
    /// The window after it.
    pub window: usize,
    /// Whether there were samples to adjust on.
    pub adjusted: bool,
    pub avg_queue: Option<f64>,
    pub ema_queue: Option<f64>,
    pub queue_samples: u64,
    pub ttft_samples: u64,
    /// Congestion signals that shrank the window (a burst within the
    /// cooldown counts once).
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
    /// Recent (time to first token, prefill tokens) pairs.
    ttft_recent: VecDeque<(f64, f64)>,
    step: StepStats,
    step_sum: f64,
}

/// TTFT samples kept for the no-queueing baseline.
const BASELINE_SAMPLES: usize = 256;

impl Aimd {
    pub fn new(cfg: AimdConfig) -> Result<Self, String> {
        cfg.validate()?;
        let w = cfg.initial_window.clamp(cfg.min_window, cfg.max_window);
        Ok(Aimd {
            window: w,
            ema: None,
            interval_sum: 0.0,
            interval_n: 0,
            last_shrink: None,
            ttft_recent: VecDeque::with_capacity(BASELINE_SAMPLES),
            step: StepStats::default(),
            step_sum: 0.0,
            cfg,
        })
    }

    pub fn config(&self) -> &AimdConfig {
        &self.cfg
    }

    /// The number of requests that may be in flight.
    pub fn window(&self) -> usize {
        self.window.floor().clamp(self.cfg.min_window.floor(), self.cfg.max_window.floor()) as usize
    }

    /// The smoothed queue signal, if any interval was applied.
    pub fn ema(&self) -> Option<f64> {
        self.ema
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
            Signal::FirstToken { seconds: t, prefill_tokens } if t.is_finite() && t >= 0.0 => {
                self.step.ttft_samples += 1;
                let n = prefill_tokens.max(1) as f64;
                if self.ttft_recent.len() == BASELINE_SAMPLES {
                    self.ttft_recent.pop_front();
                }
                self.ttft_recent.push_back((t, n));
                self.push_sample((t - self.prefill_baseline(n)).max(0.0));
            }
            Signal::Congestion { retry_attempt } => {
                let recent = self.last_shrink.is_some_and(|t| now - t < self.cfg.cooldown);
                if !recent {
                    self.step.congestion_events += 1;
                    let f = if retry_attempt >= 3 { self.cfg.severe_decrease } else { self.cfg.decrease };
                    self.shrink(f, now);
                }
            }
            _ => {}
        }
        if self.cfg.interval > 0 && self.interval_n >= self.cfg.interval {
            self.adjust(now);
        }
        self.window() != before
    }

    /// Upper bound of an unqueued prefill of `n` tokens from the recent
    /// samples (see [`Signal::FirstToken`]); includes the newest sample.
    fn prefill_baseline(&self, n: f64) -> f64 {
        self.ttft_recent.iter().map(|&(t, nj)| t * (n / nj).max(1.0)).fold(f64::INFINITY, f64::min)
    }

    fn push_sample(&mut self, q: f64) {
        self.interval_sum += q;
        self.interval_n += 1;
        self.step_sum += q;
    }

    fn shrink(&mut self, factor: f64, now: f64) {
        self.window = (self.window * factor).clamp(self.cfg.min_window, self.cfg.max_window);
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
            let headroom = (self.cfg.target / ema.max(1e-3)).min(self.cfg.headroom_cap);
            self.window = (self.window + self.cfg.additive_increase * headroom).min(self.cfg.max_window);
            self.step.grows += 1;
        }
    }

    /// End of a training step: apply pending samples and return (and reset)
    /// the step's counters.
    pub fn step(&mut self, now: f64) -> StepStats {
        let window_before = self.window();
        let adjusted = self.interval_n > 0;
        self.adjust(now);
        let mut out = std::mem::take(&mut self.step);
        let n = out.queue_samples + out.ttft_samples;
        out.avg_queue = (n > 0).then(|| self.step_sum / n as f64);
        out.ema_queue = self.ema;
        out.window_before = window_before;
        out.window = self.window();
        out.adjusted = adjusted;
        self.step_sum = 0.0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn aimd() -> Aimd {
        Aimd::new(AimdConfig { initial_window: 16.0, interval: 4, ..Default::default() }).unwrap()
    }

    fn ttft(seconds: f64, prefill_tokens: u64) -> Signal {
        Signal::FirstToken { seconds, prefill_tokens }
    }

    #[test]
    fn grows_below_target_and_halves_above() {
        let mut a = aimd();
        for i in 0..4 {
            a.observe(Signal::QueueTime(0.05), f64::from(i));
        }
        assert_eq!(a.window(), 20); // 16 + 1.0 * min(0.5/0.05, 4)
        for i in 0..4 {
            a.observe(Signal::QueueTime(5.0), 10.0 + f64::from(i));
        }
        // EMA 0.3*5 + 0.7*0.05 > 0.5: halve.
        assert_eq!(a.window(), 10);
    }

    #[test]
    fn additive_increase_scales_growth() {
        let cfg = AimdConfig { initial_window: 16.0, interval: 2, additive_increase: 0.5, ..Default::default() };
        let mut a = Aimd::new(cfg).unwrap();
        a.observe(Signal::QueueTime(0.0), 0.0);
        a.observe(Signal::QueueTime(0.0), 0.1);
        assert_eq!(a.window(), 18); // 16 + 0.5 * 4
    }

    #[test]
    fn congestion_shrinks_once_per_cooldown() {
        let mut a = aimd();
        assert!(a.observe(Signal::Congestion { retry_attempt: 1 }, 0.0));
        assert_eq!(a.window(), 8);
        assert!(!a.observe(Signal::Congestion { retry_attempt: 1 }, 0.5));
        assert!(a.observe(Signal::Congestion { retry_attempt: 3 }, 2.0));
        assert_eq!(a.window(), 2);
        assert_eq!(a.step(3.0).congestion_events, 2);
    }

    #[test]
    fn ttft_fallback_uses_the_excess_over_baseline() {
        let mut a = aimd();
        for (i, t) in [0.2, 0.21, 0.2, 0.22].iter().enumerate() {
            a.observe(ttft(*t, 100), i as f64);
        }
        assert!(a.window() > 16, "small excess grows the window");
        for i in 0..8 {
            a.observe(ttft(3.0, 100), 10.0 + f64::from(i));
        }
        assert!(a.window() < 16, "a queue building up shrinks it");
    }

    #[test]
    fn long_prompts_are_not_mistaken_for_queueing() {
        // Prefill at ~0.4 ms/token plus 20 ms: short and long prompts
        // alternate, nothing queues. Unnormalised, every long prompt read as
        // ~2 s of queueing and the window collapsed.
        let mut a = aimd();
        for i in 0..64 {
            let n = if i % 2 == 0 { 100 } else { 5000 };
            a.observe(ttft(0.02 + 0.0004 * n as f64, n), f64::from(i));
        }
        let s = a.step(100.0);
        assert_eq!(s.shrinks, 0, "{s:?}");
        assert!(a.window() > 16);
        // The same long prompts behind a real queue still shrink it.
        for i in 0..8 {
            a.observe(ttft(0.02 + 0.0004 * 5000.0 + 3.0, 5000), 200.0 + f64::from(i));
        }
        assert!(a.step(300.0).shrinks >= 1);
    }

    #[test]
    fn config_is_clamped_or_refused_with_the_value() {
        let a = Aimd::new(AimdConfig { initial_window: 500.0, ..Default::default() }).unwrap();
        assert_eq!(a.window(), 256);
        let a = Aimd::new(AimdConfig { initial_window: 0.0, ..Default::default() }).unwrap();
        assert_eq!(a.window(), 1);
        let e = Aimd::new(AimdConfig { target: 0.0, ..Default::default() }).unwrap_err();
        assert!(e.contains("prefill_queue_target=0"), "{e}");
        let e = Aimd::new(AimdConfig { min_window: 0.0, ..Default::default() }).unwrap_err();
        assert!(e.contains("min_window=0"), "{e}");
        let e = Aimd::new(AimdConfig { decrease: 1.5, ..Default::default() }).unwrap_err();
        assert!(e.contains("multiplicative_decrease=1.5"), "{e}");
        assert!(Aimd::new(AimdConfig { alpha: f64::NAN, ..Default::default() }).is_err());
    }

    #[test]
    fn interval_zero_adjusts_only_at_step() {
        let mut a = Aimd::new(AimdConfig { initial_window: 16.0, interval: 0, ..Default::default() }).unwrap();
        for i in 0..100 {
            a.observe(Signal::QueueTime(0.0), f64::from(i));
        }
        assert_eq!(a.window(), 16);
        let s = a.step(200.0);
        assert!(s.adjusted);
        assert_eq!((s.window_before, s.window), (16, 20));
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
        assert!(s.adjusted);
        let idle = a.step(2.0);
        assert_eq!(idle.queue_samples, 0);
        assert!(!idle.adjusted);
        assert_eq!(idle.avg_queue, None);
        assert_eq!(idle.window_before, idle.window);
    }

    fn signal() -> impl Strategy<Value = Signal> {
        prop_oneof![
            (0.0f64..10.0).prop_map(Signal::QueueTime),
            (0.0f64..10.0, 0u64..10_000).prop_map(|(t, n)| ttft(t, n)),
            (1u32..6).prop_map(|r| Signal::Congestion { retry_attempt: r }),
        ]
    }

    proptest! {
        #[test]
        fn window_stays_in_bounds(
            min in 1.0f64..8.0, span in 0.0f64..300.0, start in -1.0f64..2.0,
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
                prop_assert!(a.window >= min - 1e-9);
            }
        }

        #[test]
        fn reactions_are_monotone(q in 0.0f64..10.0, n in 1u32..50) {
            let mut a = Aimd::new(AimdConfig { interval: 1, initial_window: 16.0, ..Default::default() }).unwrap();
            let before = a.window;
            for i in 0..n {
                a.observe(Signal::QueueTime(q), f64::from(i));
            }
            if q > 0.5 { prop_assert!(a.window <= before); } else { prop_assert!(a.window >= before); }
            let w = a.window;
            a.observe(Signal::Congestion { retry_attempt: 1 }, 1e6);
            prop_assert!(a.window <= w);
        }

        #[test]
        fn ttft_excess_never_exceeds_the_raw_ttft(samples in proptest::collection::vec((0.0f64..5.0, 0u64..20_000), 1..300)) {
            let mut a = Aimd::new(AimdConfig { interval: 0, ..Default::default() }).unwrap();
            for (i, (t, n)) in samples.iter().enumerate() {
                let before = a.interval_sum;
                a.observe(ttft(*t, *n), i as f64);
                let excess = a.interval_sum - before;
                prop_assert!((-1e-9..=t + 1e-9).contains(&excess), "excess {excess} for ttft {t}");
            }
        }
    }
}
