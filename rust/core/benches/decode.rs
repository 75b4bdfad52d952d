//! Criterion benchmarks of the stream core alone, on the recorded vLLM bodies
//! (`tests/data/streams`), fed in 16 KiB chunks like a socket would.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rollstream_core::sse::SseParser;
use rollstream_core::vllm::StreamDecoder;

fn stream(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/streams").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    for name in ["completions_n4_lp5.sse", "chat_n2_lp2.sse", "v2_generate_n2.sse", "v2_completion_n1_metrics.sse"] {
        let body = stream(name);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(format!("vllm/{name}"), |b| {
            b.iter(|| {
                let mut d = StreamDecoder::new();
                for chunk in body.chunks(16 * 1024) {
                    d.feed(chunk).expect("valid stream");
                }
                d.finish().expect("complete stream")
            })
        });
        g.bench_function(format!("sse-only/{name}"), |b| {
            b.iter(|| {
                let mut p = SseParser::new();
                let mut n = 0usize;
                for chunk in body.chunks(16 * 1024) {
                    p.feed::<rollstream_core::sse::EventTooLarge, _>(chunk, |e| {
                        n += e.data.len();
                        Ok(())
                    })
                    .expect("events below the cap");
                }
                n
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
