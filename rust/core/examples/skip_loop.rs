fn main() {
    let body = std::fs::read(std::env::args().nth(1).unwrap()).unwrap();
    let events: Vec<&[u8]> =
        body.split(|&b| b == b'\n').filter(|l| l.starts_with(b"data: {")).map(|l| &l[6..]).collect();
    let t = std::time::Instant::now();
    let mut n = 0;
    for _ in 0..200 {
        for e in &events {
            let mut r = rollstream_core::json::Reader::new(e);
            r.skip().unwrap();
            n += e.len();
        }
    }
    println!("skip: {:.1} MB/s", n as f64 / t.elapsed().as_secs_f64() / 1e6);
    let t = std::time::Instant::now();
    let mut k = 0usize;
    for _ in 0..200 {
        for e in &events {
            k += memchr::memchr_iter(b'"', e).count();
        }
    }
    println!("memchr count quotes: {:.1} MB/s ({k})", n as f64 / t.elapsed().as_secs_f64() / 1e6);
}
