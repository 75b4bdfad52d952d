//! Criterion benchmarks of one routing decision (`route` + `done`) at the
//! scale of issue 11: 64 engines, 10k sticky sessions already bound, and
//! requests without a session (least outstanding). Every decision scans the
//! engines once, so these are the router's whole cost per request.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rollstream_core::router::{Route, Router};

const ENGINES: usize = 64;
const SESSIONS: usize = 10_000;

fn router() -> Router {
    let mut r = Router::new();
    for i in 0..ENGINES {
        r.add(&format!("http://10.0.{}.{}:8000", i / 256, i % 256));
    }
    r
}

fn slot(route: Route) -> usize {
    match route {
        Route::Engine(slot) => slot,
        other => panic!("every engine is active, got {other:?}"),
    }
}

fn bench(c: &mut Criterion) {
    let sessions: Vec<String> = (0..SESSIONS).map(|i| format!("session-{i:05}")).collect();
    let mut g = c.benchmark_group("router");
    g.throughput(Throughput::Elements(1));

    let mut r = router();
    for s in &sessions {
        let slot = slot(r.route(Some(s)));
        r.done(slot).expect("routed above");
    }
    assert_eq!(r.session_count(), SESSIONS);
    let mut i = 0usize;
    g.bench_function(format!("sticky/{ENGINES}-engines/{SESSIONS}-sessions"), |b| {
        b.iter(|| {
            let s = &sessions[i % SESSIONS];
            i = i.wrapping_add(1);
            let slot = slot(r.route(Some(black_box(s))));
            r.done(slot).expect("routed above");
            slot
        })
    });

    // A new session each time: bound to the least-loaded engine, then
    // released, so the table stays at 10k bindings.
    let fresh: Vec<String> = (0..SESSIONS).map(|i| format!("fresh-{i:05}")).collect();
    let mut i = 0usize;
    g.bench_function(format!("new-session/{ENGINES}-engines/{SESSIONS}-sessions"), |b| {
        b.iter(|| {
            let s = &fresh[i % SESSIONS];
            i = i.wrapping_add(1);
            let slot = slot(r.route(Some(black_box(s))));
            r.done(slot).expect("routed above");
            r.finish_session(s)
        })
    });

    let mut r = router();
    g.bench_function(format!("no-session/{ENGINES}-engines"), |b| {
        b.iter(|| {
            let slot = slot(r.route(black_box(None)));
            r.done(slot).expect("routed above");
            slot
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
