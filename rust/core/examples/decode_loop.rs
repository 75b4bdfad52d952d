//! Decode a recorded stream many times (for profiling the decoder).
//! Usage: cargo run --release --example decode_loop -- FILE [ITERATIONS]

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: decode_loop FILE [ITERATIONS]")?;
    let iters: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(100);
    let body = std::fs::read(path)?;
    let t = std::time::Instant::now();
    let mut tokens = 0usize;
    for _ in 0..iters {
        let mut d = rollstream_core::vllm::StreamDecoder::new();
        for chunk in body.chunks(16 * 1024) {
            d.feed(chunk)?;
        }
        tokens += d.finish()?.choices.iter().map(|c| c.token_ids.len()).sum::<usize>();
    }
    let secs = t.elapsed().as_secs_f64();
    println!("{:.1} MB/s, {tokens} tokens", (body.len() * iters) as f64 / secs / 1e6);
    Ok(())
}
