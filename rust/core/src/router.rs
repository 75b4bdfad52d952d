//! Client-side routing over a set of inference engines (vLLM servers).
//!
//! The policy SkyRL, prime-rl and vllm-router converged on after pure
//! consistent hashing locked a saturated engine into KV-cache thrash while
//! others idled: **sticky least-loaded**.
//!
//! - A request with a session goes to the engine that session is bound to.
//!   A new session (or one whose engine is down or removed) is bound to the
//!   active engine with the fewest bound sessions; ties are broken by
//!   rendezvous hashing of (session, engine), so the choice is stable and
//!   spread evenly. `finish_session` releases the binding.
//! - A request without a session goes to the active engine with the fewest
//!   outstanding requests; ties rotate (rendezvous hash of a counter).
//! - A paused engine takes no new request. A session bound to a paused engine
//!   waits for it ([`Route::Wait`]) rather than moving: its prefix cache is
//!   there, and a deployment-wide pause ends within one reload.
//! - A down engine is out of rotation; its sessions move on their next
//!   request. An error ([`Route::NoEngine`]) only when no engine is left that
//!   could ever serve (every engine removed).
//!
//! Every decision is O(engines); nothing allocates except a new session's
//! key. The caller pairs each [`Router::route`] that returned an engine with
//! exactly one [`Router::done`].

use std::collections::HashMap;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The state of one engine, as far as routing is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineState {
    /// Takes new requests.
    Active,
    /// Temporarily takes none (a weight update is in progress); comes back.
    Paused,
    /// Failed or stopped: out of rotation until set active again.
    Down,
}

/// Where a request should go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The slot of the chosen engine (outstanding count already incremented).
    Engine(usize),
    /// No eligible engine now, but a paused or down one may come back.
    Wait,
    /// No engine at all.
    NoEngine,
}

#[derive(Clone, Debug)]
struct Engine {
    id: String,
    key: u64,
    state: EngineState,
    outstanding: u32,
    sessions: u32,
}

/// Load of one engine, for reports and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineLoad {
    pub slot: usize,
    pub id: String,
    pub state: EngineState,
    pub outstanding: u32,
    pub sessions: u32,
}

/// Errors of the router's bookkeeping calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouterError {
    UnknownEngine(String),
    UnknownSlot(usize),
    NotOutstanding(usize),
}

impl std::fmt::Display for RouterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouterError::UnknownEngine(id) => write!(f, "no engine {id:?} in the router"),
            RouterError::UnknownSlot(slot) => write!(f, "no engine in slot {slot}"),
            RouterError::NotOutstanding(slot) => {
                write!(f, "done() for engine slot {slot} without an outstanding request")
            }
        }
    }
}

impl std::error::Error for RouterError {}

/// Sticky least-loaded routing state. Slots are stable: a removed engine's
/// slot stays empty forever, so a slot held by an in-flight request never
/// changes meaning.
#[derive(Default, Debug)]
pub struct Router {
    slots: Vec<Option<Engine>>,
    by_id: HashMap<String, usize>,
    sessions: HashMap<String, usize>,
    counter: u64,
}

const SESSION_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add an engine (active) and return its slot. Adding an id that is
    /// present sets it active again and returns its slot.
    pub fn add(&mut self, id: &str) -> usize {
        if let Some(&slot) = self.by_id.get(id) {
            if let Some(e) = self.slots[slot].as_mut() {
                e.state = EngineState::Active;
            }
            return slot;
        }
        let engine = Engine {
            id: id.to_owned(),
            key: xxh3_64_with_seed(id.as_bytes(), SESSION_SEED),
            state: EngineState::Active,
            outstanding: 0,
            sessions: 0,
        };
        // Slots are never reused: a request in flight on a removed engine
        // still calls done() with its slot.
        self.slots.push(Some(engine));
        let slot = self.slots.len() - 1;
        self.by_id.insert(id.to_owned(), slot);
        slot
    }

    /// Remove an engine. Its sessions move on their next request; requests
    /// in flight on it still call [`Router::done`] with its slot, which is
    /// then ignored.
    pub fn remove(&mut self, id: &str) -> Result<usize, RouterError> {
        let slot = self.by_id.remove(id).ok_or_else(|| RouterError::UnknownEngine(id.to_owned()))?;
        self.slots[slot] = None;
        self.sessions.retain(|_, s| *s != slot);
        Ok(slot)
    }

    pub fn set_state(&mut self, id: &str, state: EngineState) -> Result<(), RouterError> {
        let slot = *self.by_id.get(id).ok_or_else(|| RouterError::UnknownEngine(id.to_owned()))?;
        if let Some(e) = self.slots[slot].as_mut() {
            e.state = state;
        }
        Ok(())
    }

    pub fn slot_of(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    pub fn id_of(&self, slot: usize) -> Option<&str> {
        self.slots.get(slot).and_then(|e| e.as_ref()).map(|e| e.id.as_str())
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Choose an engine for a request (and count it as outstanding there).
    pub fn route(&mut self, session: Option<&str>) -> Route {
        if self.by_id.is_empty() {
            return Route::NoEngine;
        }
        let chosen = match session {
            Some(s) => self.route_session(s),
            None => self.least_outstanding(),
        };
        match chosen {
            Ok(slot) => {
                if let Some(e) = self.slots[slot].as_mut() {
                    e.outstanding += 1;
                }
                Route::Engine(slot)
            }
            Err(route) => route,
        }
    }

    fn route_session(&mut self, session: &str) -> Result<usize, Route> {
        if let Some(&slot) = self.sessions.get(session) {
            match self.slots.get(slot).and_then(|e| e.as_ref()).map(|e| e.state) {
                Some(EngineState::Active) => return Ok(slot),
                Some(EngineState::Paused) => return Err(Route::Wait),
                // Down or removed: the session moves.
                Some(EngineState::Down) | None => {
                    if let Some(Some(e)) = self.slots.get_mut(slot) {
                        e.sessions = e.sessions.saturating_sub(1);
                    }
                    self.sessions.remove(session);
                }
            }
        }
        let h = xxh3_64_with_seed(session.as_bytes(), SESSION_SEED);
        let slot = self.pick(|e| (e.sessions, u64::MAX - mix(h, e.key)))?;
        if let Some(e) = self.slots[slot].as_mut() {
            e.sessions += 1;
        }
        self.sessions.insert(session.to_owned(), slot);
        Ok(slot)
    }

    fn least_outstanding(&mut self) -> Result<usize, Route> {
        self.counter = self.counter.wrapping_add(1);
        let h = mix(self.counter, SESSION_SEED);
        self.pick(|e| (e.outstanding, u64::MAX - mix(h, e.key)))
    }

    /// The active engine minimising `cost`; Wait when none is active but one
    /// may come back.
    fn pick<K: Ord>(&self, cost: impl Fn(&Engine) -> (u32, K)) -> Result<usize, Route> {
        let mut best: Option<(usize, (u32, K))> = None;
        for (slot, e) in self.slots.iter().enumerate() {
            let Some(e) = e else { continue };
            if e.state != EngineState::Active {
                continue;
            }
            let c = cost(e);
            if best.as_ref().is_none_or(|(_, b)| c < *b) {
                best = Some((slot, c));
            }
        }
        best.map(|(slot, _)| slot).ok_or(Route::Wait)
    }

    /// A request routed to `slot` finished (or failed).
    pub fn done(&mut self, slot: usize) -> Result<(), RouterError> {
        match self.slots.get_mut(slot) {
            Some(Some(e)) => {
                if e.outstanding == 0 {
                    return Err(RouterError::NotOutstanding(slot));
                }
                e.outstanding -= 1;
                Ok(())
            }
            // Removed while the request was in flight.
            Some(None) => Ok(()),
            None => Err(RouterError::UnknownSlot(slot)),
        }
    }

    /// Release a session's binding; true when it was bound.
    pub fn finish_session(&mut self, session: &str) -> bool {
        match self.sessions.remove(session) {
            Some(slot) => {
                if let Some(Some(e)) = self.slots.get_mut(slot) {
                    e.sessions = e.sessions.saturating_sub(1);
                }
                true
            }
            None => false,
        }
    }

    /// The engine a session is bound to, if any.
    pub fn session_engine(&self, session: &str) -> Option<usize> {
        self.sessions.get(session).copied()
    }

    pub fn loads(&self) -> Vec<EngineLoad> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, e)| {
                e.as_ref().map(|e| EngineLoad {
                    slot,
                    id: e.id.clone(),
                    state: e.state,
                    outstanding: e.outstanding,
                    sessions: e.sessions,
                })
            })
            .collect()
    }
}

/// A 64-bit mix of two hashes (the rendezvous weight of a pair).
#[inline]
fn mix(a: u64, b: u64) -> u64 {
    let mut x = a ^ b.rotate_left(29);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn router(n: usize) -> Router {
        let mut r = Router::new();
        for i in 0..n {
            r.add(&format!("http://e{i}"));
        }
        r
    }

    fn engine(route: Route) -> usize {
        match route {
            Route::Engine(s) => s,
            other => panic!("expected an engine, got {other:?}"),
        }
    }

    #[test]
    fn sessions_stick_and_spread() {
        let mut r = router(4);
        let mut bound = HashMap::new();
        for s in 0..400 {
            let slot = engine(r.route(Some(&format!("s{s}"))));
            r.done(slot).unwrap();
            bound.insert(s, slot);
        }
        // Least-loaded placement: every engine gets exactly a quarter.
        for load in r.loads() {
            assert_eq!(load.sessions, 100, "{load:?}");
        }
        for s in 0..400 {
            let slot = engine(r.route(Some(&format!("s{s}"))));
            r.done(slot).unwrap();
            assert_eq!(slot, bound[&s]);
        }
    }

    #[test]
    fn finish_session_frees_capacity() {
        let mut r = router(2);
        let a = engine(r.route(Some("a")));
        r.done(a).unwrap();
        assert!(r.finish_session("a"));
        assert!(!r.finish_session("a"));
        assert_eq!(r.loads().iter().map(|l| l.sessions).sum::<u32>(), 0);
        assert_eq!(r.session_count(), 0);
    }

    #[test]
    fn paused_engine_holds_its_sessions_and_takes_no_new_requests() {
        let mut r = router(2);
        let a = engine(r.route(Some("a")));
        r.done(a).unwrap();
        let id = r.id_of(a).unwrap().to_owned();
        r.set_state(&id, EngineState::Paused).unwrap();
        assert_eq!(r.route(Some("a")), Route::Wait);
        for _ in 0..10 {
            let other = engine(r.route(None));
            assert_ne!(other, a);
            r.done(other).unwrap();
        }
        let other_id = r.id_of(1 - a).unwrap().to_owned();
        r.set_state(&other_id, EngineState::Paused).unwrap();
        assert_eq!(r.route(None), Route::Wait);
        r.set_state(&id, EngineState::Active).unwrap();
        assert_eq!(r.route(Some("a")), Route::Engine(a));
    }

    #[test]
    fn down_engine_sessions_move() {
        let mut r = router(2);
        let a = engine(r.route(Some("a")));
        r.done(a).unwrap();
        let id = r.id_of(a).unwrap().to_owned();
        r.set_state(&id, EngineState::Down).unwrap();
        let moved = engine(r.route(Some("a")));
        assert_ne!(moved, a);
        r.done(moved).unwrap();
        assert_eq!(r.session_engine("a"), Some(moved));
        let loads = r.loads();
        assert_eq!(loads[a].sessions, 0);
        assert_eq!(loads[moved].sessions, 1);
    }

    #[test]
    fn removal_keeps_slots_stable_and_ignores_late_done() {
        let mut r = router(3);
        let s = engine(r.route(None));
        let id = r.id_of(s).unwrap().to_owned();
        r.remove(&id).unwrap();
        assert!(r.done(s).is_ok());
        assert_eq!(r.len(), 2);
        assert!(matches!(r.remove(&id), Err(RouterError::UnknownEngine(_))));
        let again = r.add(&id);
        assert_eq!(r.id_of(again), Some(id.as_str()));
        r.remove("http://e0").ok();
        r.remove("http://e1").ok();
        r.remove("http://e2").ok();
        assert_eq!(r.route(None), Route::NoEngine);
    }

    #[test]
    fn unbalanced_done_is_an_error_not_an_underflow() {
        let mut r = router(1);
        assert_eq!(r.done(0), Err(RouterError::NotOutstanding(0)));
        assert_eq!(r.done(7), Err(RouterError::UnknownSlot(7)));
    }

    #[test]
    fn least_outstanding_fills_evenly() {
        let mut r = router(4);
        let mut slots = vec![];
        for _ in 0..40 {
            slots.push(engine(r.route(None)));
        }
        for load in r.loads() {
            assert_eq!(load.outstanding, 10);
        }
        for s in slots {
            r.done(s).unwrap();
        }
        assert!(r.loads().iter().all(|l| l.outstanding == 0));
    }

    proptest! {
        #[test]
        fn outstanding_counts_balance(ops in proptest::collection::vec((0u8..6, 0u8..8), 1..300)) {
            let mut r = router(3);
            let mut held: Vec<usize> = vec![];
            for (op, arg) in ops {
                match op {
                    0 | 1 => {
                        let session = format!("s{arg}");
                        if let Route::Engine(s) = r.route((op == 1).then_some(session.as_str())) {
                            held.push(s);
                        }
                    }
                    2 => if let Some(s) = held.pop() { r.done(s).unwrap(); },
                    3 => { r.set_state(&format!("http://e{}", arg % 3), EngineState::Paused).unwrap(); }
                    4 => { r.set_state(&format!("http://e{}", arg % 3), EngineState::Active).unwrap(); }
                    _ => { r.finish_session(&format!("s{arg}")); }
                }
                let out: u32 = r.loads().iter().map(|l| l.outstanding).sum();
                prop_assert_eq!(out as usize, held.len());
                let bound: u32 = r.loads().iter().map(|l| l.sessions).sum();
                prop_assert_eq!(bound as usize, r.session_count());
            }
        }
    }
}
