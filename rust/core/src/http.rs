//! The sampler's data plane: streaming HTTP/1.1 requests on a small tokio
//! runtime of our own, each response body decoded frame by frame with the
//! [`crate::vllm::StreamDecoder`], and one completion callback per request.
//!
//! Python is woken once per finished sample instead of once per token,
//! which is what makes client CPU per streamed token small. Retries,
//! deadlines across attempts and concurrency control belong to the caller;
//! this layer performs exactly one attempt and reports precisely how it
//! ended: the completion callback runs exactly once per request, also when
//! the client shuts down with the request in flight ([`HttpError::Closed`]).

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;

use crate::vllm::{DecodeError, StreamDecoder, StreamOutput};

/// Default [`ClientConfig::read_coalesce`], in microseconds.
pub const DEFAULT_READ_COALESCE_US: u64 = 2000;

/// Cap on an error response body kept for the message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Client-wide settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub worker_threads: usize,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Cap on one SSE event's buffered bytes (see [`crate::sse`]).
    pub max_event_bytes: usize,
    /// With at least two streams in flight, how long a worker waits before
    /// it sleeps on the sockets again. vLLM writes one HTTP chunk per token
    /// and stream, all streams' chunks of an engine step within a few
    /// hundred microseconds: waking once per chunk costs a thread wake-up
    /// (a context switch on cores the engine keeps busy) per token, while
    /// waiting this long lets one wake-up read a whole step's chunks. Zero
    /// disables it. Adds at most this much latency per step, nothing per
    /// request when only one stream is in flight.
    pub read_coalesce: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            worker_threads: 1,
            connect_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 1024,
            max_event_bytes: crate::sse::DEFAULT_MAX_EVENT_BYTES,
            read_coalesce: Duration::from_micros(DEFAULT_READ_COALESCE_US),
        }
    }
}

/// One streaming POST.
#[derive(Debug, Clone)]
pub struct StreamRequest {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Longest silence allowed between body frames (and before the head).
    pub idle_timeout: Duration,
    /// Deadline for the whole attempt.
    pub total_timeout: Duration,
}

/// Timings of an attempt, in seconds from the request being sent.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Response head received.
    pub head: f64,
    /// First byte of the body.
    pub first_byte: f64,
    /// First event carrying a token.
    pub first_token: f64,
    pub total: f64,
}

/// A completed attempt: a 2xx response whose stream decoded to `[DONE]`.
#[derive(Debug, Clone)]
pub struct StreamOutcome {
    pub status: u16,
    pub output: StreamOutput,
    pub timings: Timings,
    /// Response headers the caller cares about (lower-case names).
    pub request_id: Option<String>,
}

/// How an attempt failed.
#[derive(Debug, Clone)]
pub enum HttpError {
    /// The request was malformed on our side (bad URL, header).
    Invalid(String),
    /// Could not connect (refused, unreachable, connect timeout).
    Connect(String),
    /// No progress for `idle_timeout`, or the total deadline passed.
    Timeout { phase: &'static str, after: f64, tokens: usize },
    /// The connection broke after it was established.
    Transport { message: String, tokens: usize },
    /// A non-2xx response; `body` is (the start of) its text.
    Status { status: u16, body: String, retry_after: Option<String> },
    /// The body was not a complete, valid vLLM stream.
    Decode { error: DecodeError, tokens: usize },
    /// The caller cancelled the request.
    Cancelled,
    /// The client was shut down while the request was in flight (or before
    /// it was submitted): nothing more will arrive.
    Closed,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Invalid(m) => write!(f, "invalid request: {m}"),
            HttpError::Connect(m) => write!(f, "cannot connect: {m}"),
            HttpError::Timeout { phase, after, tokens } => {
                write!(f, "timed out {phase} after {after:.1} s ({tokens} tokens received)")
            }
            HttpError::Transport { message, tokens } => {
                write!(f, "connection failed mid-stream after {tokens} tokens: {message}")
            }
            HttpError::Status { status, body, .. } => write!(f, "HTTP {status}: {body}"),
            HttpError::Decode { error, tokens } => write!(f, "{error} ({tokens} tokens decoded)"),
            HttpError::Cancelled => f.write_str("cancelled"),
            HttpError::Closed => f.write_str("the streaming client was closed with the request in flight"),
        }
    }
}

impl std::error::Error for HttpError {}

/// Live view of an in-flight request.
#[derive(Debug, Default)]
pub struct Progress {
    tokens: AtomicU64,
    cancelled: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Progress {
    /// Tokens decoded so far.
    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }

    /// Cancel the request: the connection is dropped, which makes vLLM
    /// abort the generation. The callback then reports `Cancelled`.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }
}

/// The streaming client. Cheap to share; dropping it shuts its runtime down.
pub struct StreamClient {
    /// Always Some until drop (taken to shut down without blocking).
    runtime: Option<tokio::runtime::Runtime>,
    client: HyperClient<HttpConnector, Full<Bytes>>,
    in_flight: Arc<AtomicU64>,
    max_event_bytes: usize,
}

impl fmt::Debug for StreamClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamClient").field("in_flight", &self.in_flight.load(Ordering::Relaxed)).finish()
    }
}

type Done = Box<dyn FnOnce(Result<StreamOutcome, HttpError>) + Send + 'static>;

/// Owns a request's completion callback and its in-flight count.
///
/// Invariant: the callback runs exactly once. [`Completion::finish`] runs it
/// with the attempt's result; if the task is dropped first (the runtime
/// shutting down drops every pending task), `Drop` runs it with
/// [`HttpError::Closed`], so no caller waits forever.
struct Completion {
    done: Option<Done>,
    in_flight: Arc<AtomicU64>,
}

impl Completion {
    fn new(done: Done, in_flight: Arc<AtomicU64>) -> Self {
        in_flight.fetch_add(1, Ordering::Relaxed);
        Completion { done: Some(done), in_flight }
    }

    fn finish(mut self, result: Result<StreamOutcome, HttpError>) {
        self.deliver(result);
    }

    fn deliver(&mut self, result: Result<StreamOutcome, HttpError>) {
        if let Some(done) = self.done.take() {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            done(result);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.deliver(Err(HttpError::Closed));
    }
}

impl StreamClient {
    pub fn new(config: ClientConfig) -> std::io::Result<Self> {
        let in_flight = Arc::new(AtomicU64::new(0));
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(config.worker_threads.max(1)).thread_name("rollstream-http").enable_all();
        if !config.read_coalesce.is_zero() {
            let streams = Arc::clone(&in_flight);
            let nap = config.read_coalesce;
            // Called when a worker has nothing left to run and is about to
            // sleep on the sockets: with several streams in flight, their
            // next chunks are about to arrive together; let them.
            builder.on_thread_park(move || {
                if streams.load(Ordering::Relaxed) >= 2 {
                    std::thread::sleep(nap);
                }
            });
        }
        let runtime = builder.build()?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .build(connector);
        let max_event_bytes = config.max_event_bytes;
        Ok(StreamClient { runtime: Some(runtime), client, in_flight, max_event_bytes })
    }

    /// Requests currently in flight.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Start one attempt. `done` runs exactly once: on a runtime thread when
    /// the attempt ends, with [`HttpError::Closed`] when the client shuts down
    /// first (on the thread that drops the task).
    pub fn submit(&self, req: StreamRequest, done: Done) -> Arc<Progress> {
        let progress = Arc::new(Progress::default());
        let task_progress = progress.clone();
        let client = self.client.clone();
        let max_event_bytes = self.max_event_bytes;
        let completion = Completion::new(done, self.in_flight.clone());
        let Some(runtime) = &self.runtime else {
            completion.finish(Err(HttpError::Closed));
            return progress;
        };
        runtime.spawn(async move {
            let total = req.total_timeout;
            let started = Instant::now();
            let result = tokio::select! {
                biased;
                _ = wait_cancel(&task_progress) => Err(HttpError::Cancelled),
                r = tokio::time::timeout(total, run(client, req, &task_progress, started, max_event_bytes)) => match r {
                    Ok(r) => r,
                    Err(_) => Err(HttpError::Timeout {
                        phase: "(total deadline)",
                        after: started.elapsed().as_secs_f64(),
                        tokens: task_progress.tokens() as usize,
                    }),
                },
            };
            completion.finish(result);
        });
        progress
    }

    /// Run a future on the client's runtime and wait for it (for tests and
    /// simple control-plane calls from Rust).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> Option<F::Output> {
        self.runtime.as_ref().map(|r| r.block_on(f))
    }
}

impl Drop for StreamClient {
    fn drop(&mut self) {
        // Never block here: a completion callback may be waiting for a lock
        // (e.g. Python's GIL) held by the thread dropping the client.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn wait_cancel(p: &Progress) {
    loop {
        if p.cancelled.load(Ordering::SeqCst) {
            return;
        }
        p.notify.notified().await;
    }
}

fn build_request(req: &StreamRequest) -> Result<Request<Full<Bytes>>, HttpError> {
    let uri: hyper::Uri = req.url.parse().map_err(|e| HttpError::Invalid(format!("bad URL {:?}: {e}", req.url)))?;
    if uri.scheme_str() != Some("http") {
        return Err(HttpError::Invalid(format!("only http:// URLs are streamed natively, got {:?}", req.url)));
    }
    let mut b = Request::builder().method(Method::POST).uri(uri);
    let mut has_ct = false;
    for (k, v) in &req.headers {
        has_ct |= k.eq_ignore_ascii_case("content-type");
        b = b.header(k.as_str(), v.as_str());
    }
    if !has_ct {
        b = b.header("content-type", "application/json");
    }
    b = b.header("accept", "text/event-stream");
    b.body(Full::new(Bytes::from(req.body.clone()))).map_err(|e| HttpError::Invalid(format!("bad header: {e}")))
}

async fn run(
    client: HyperClient<HttpConnector, Full<Bytes>>,
    req: StreamRequest,
    progress: &Progress,
    started: Instant,
    max_event_bytes: usize,
) -> Result<StreamOutcome, HttpError> {
    let http_req = build_request(&req)?;
    let idle = req.idle_timeout;
    let resp: Response<Incoming> = match tokio::time::timeout(idle, client.request(http_req)).await {
        Err(_) => {
            return Err(HttpError::Timeout {
                phase: "waiting for the response head",
                after: started.elapsed().as_secs_f64(),
                tokens: 0,
            })
        }
        Ok(Err(e)) => {
            return Err(if e.is_connect() {
                HttpError::Connect(error_chain(&e))
            } else {
                HttpError::Transport { message: error_chain(&e), tokens: 0 }
            })
        }
        Ok(Ok(r)) => r,
    };
    let mut timings = Timings { head: started.elapsed().as_secs_f64(), ..Default::default() };
    let status = resp.status().as_u16();
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let request_id = header("x-request-id");
    let retry_after = header("retry-after");
    let mut body = resp.into_body();
    if !(200..300).contains(&status) {
        let mut text = Vec::new();
        while text.len() < MAX_ERROR_BODY {
            match tokio::time::timeout(idle, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        text.extend_from_slice(data);
                    }
                }
                _ => break,
            }
        }
        text.truncate(MAX_ERROR_BODY);
        return Err(HttpError::Status { status, body: String::from_utf8_lossy(&text).into_owned(), retry_after });
    }
    let mut decoder = StreamDecoder::with_max_event_bytes(max_event_bytes);
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(HttpError::Timeout {
                    phase: "waiting for stream data",
                    after: started.elapsed().as_secs_f64(),
                    tokens: decoder.tokens(),
                })
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(HttpError::Transport { message: error_chain(&e), tokens: decoder.tokens() })
            }
            Ok(Some(Ok(f))) => f,
        };
        let Some(data) = frame.data_ref() else { continue };
        if timings.first_byte == 0.0 && !data.is_empty() {
            timings.first_byte = started.elapsed().as_secs_f64();
        }
        if let Err(error) = decoder.feed(data) {
            return Err(HttpError::Decode { error, tokens: decoder.tokens() });
        }
        let tokens = decoder.tokens();
        if tokens > 0 && timings.first_token == 0.0 {
            timings.first_token = started.elapsed().as_secs_f64();
        }
        progress.tokens.store(tokens as u64, Ordering::Relaxed);
    }
    let tokens = decoder.tokens();
    let output = decoder.finish().map_err(|error| HttpError::Decode { error, tokens })?;
    timings.total = started.elapsed().as_secs_f64();
    Ok(StreamOutcome { status, output, timings, request_id })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP/1.1 server on loopback that answers with `reply`
    /// (written in `parts`, with `pause` between them).
    fn serve(client: &StreamClient, parts: Vec<Vec<u8>>, pause: Duration) -> String {
        let listener = client.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
        let addr = listener.local_addr().unwrap();
        client.runtime.as_ref().unwrap().spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 65536];
            let _ = sock.read(&mut buf).await;
            for p in parts {
                if sock.write_all(&p).await.is_err() {
                    return;
                }
                tokio::time::sleep(pause).await;
            }
        });
        format!("http://{addr}/v1/completions")
    }

    fn chunked(events: &[&str]) -> Vec<Vec<u8>> {
        let mut parts =
            vec![b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec()];
        for e in events {
            let data = format!("data: {e}\n\n");
            parts.push(format!("{:x}\r\n{data}\r\n", data.len()).into_bytes());
        }
        parts
    }

    fn request(url: String) -> StreamRequest {
        StreamRequest {
            url,
            headers: vec![("x-request-id".into(), "r1".into())],
            body: b"{}".to_vec(),
            idle_timeout: Duration::from_secs(2),
            total_timeout: Duration::from_secs(5),
        }
    }

    fn call(client: &StreamClient, req: StreamRequest) -> Result<StreamOutcome, HttpError> {
        let (tx, rx) = mpsc::channel();
        client.submit(req, Box::new(move |r| tx.send(r).unwrap()));
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn streams_and_decodes() {
        let client = StreamClient::new(ClientConfig::default()).unwrap();
        let mut parts = chunked(&[
            r#"{"id":"c","choices":[{"index":0,"text":"a","token_ids":[1]}]}"#,
            r#"{"id":"c","choices":[{"index":0,"text":"b","token_ids":[2],"finish_reason":"length"}]}"#,
            "[DONE]",
        ]);
        parts.push(b"0\r\n\r\n".to_vec());
        let url = serve(&client, parts, Duration::from_millis(1));
        let out = call(&client, request(url)).unwrap();
        assert_eq!(out.output.choices[0].token_ids, vec![1, 2]);
        assert!(out.timings.first_token > 0.0);
        assert!(out.timings.total >= out.timings.first_token);
    }

    #[test]
    fn truncated_stream_is_a_decode_error() {
        let client = StreamClient::new(ClientConfig::default()).unwrap();
        // The server closes after one event: no [DONE], no terminating chunk.
        let url = serve(&client, chunked(&[r#"{"choices":[{"index":0,"token_ids":[1]}]}"#]), Duration::ZERO);
        match call(&client, request(url)) {
            Err(HttpError::Transport { tokens, .. }) | Err(HttpError::Decode { tokens, .. }) => assert_eq!(tokens, 1),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn error_status_keeps_body_and_retry_after() {
        let client = StreamClient::new(ClientConfig::default()).unwrap();
        let body = r#"{"error":{"message":"queue full","code":503}}"#;
        let reply = format!(
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 2\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let url = serve(&client, vec![reply.into_bytes()], Duration::ZERO);
        match call(&client, request(url)) {
            Err(HttpError::Status { status: 503, body: b, retry_after }) => {
                assert!(b.contains("queue full"));
                assert_eq!(retry_after.as_deref(), Some("2"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn idle_timeout_and_connect_errors() {
        let client = StreamClient::new(ClientConfig::default()).unwrap();
        // Head and one event arrive together, then the server goes silent.
        let parts = vec![chunked(&[r#"{"choices":[{"index":0,"token_ids":[1]}]}"#]).concat(), Vec::new()];
        let url = serve(&client, parts, Duration::from_secs(3));
        let mut req = request(url);
        req.idle_timeout = Duration::from_millis(300);
        assert!(matches!(call(&client, req), Err(HttpError::Timeout { tokens: 1, .. })));
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let r = call(&client, request(format!("http://127.0.0.1:{port}/x")));
        assert!(matches!(r, Err(HttpError::Connect(_))), "{r:?}");
        assert!(matches!(call(&client, request("https://x/".into())), Err(HttpError::Invalid(_))));
    }

    #[test]
    fn shutdown_fails_requests_in_flight_with_closed() {
        let client = StreamClient::new(ClientConfig::default()).unwrap();
        // Head and one event, then silence: the request stays in flight.
        let parts = vec![chunked(&[r#"{"choices":[{"index":0,"token_ids":[1]}]}"#]).concat(), Vec::new()];
        let url = serve(&client, parts, Duration::from_secs(30));
        let (tx, rx) = mpsc::channel();
        client.submit(request(url), Box::new(move |r| tx.send(r).unwrap()));
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(client.in_flight(), 1);
        drop(client);
        let r = rx.recv_timeout(Duration::from_secs(10)).expect("the callback must run on shutdown");
        assert!(matches!(r, Err(HttpError::Closed)), "{r:?}");
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "exactly once");
    }

    #[test]
    fn submit_after_shutdown_reports_closed() {
        let mut client = StreamClient::new(ClientConfig::default()).unwrap();
        if let Some(rt) = client.runtime.take() {
            rt.shutdown_background();
        }
        let r = call(&client, request("http://127.0.0.1:9/x".into()));
        assert!(matches!(r, Err(HttpError::Closed)), "{r:?}");
        assert_eq!(client.in_flight(), 0);
    }

    #[test]
    fn cancel_reports_cancelled() {
        let client = StreamClient::new(ClientConfig::default()).unwrap();
        let url = serve(&client, chunked(&[r#"{"choices":[]}"#]), Duration::from_secs(5));
        let (tx, rx) = mpsc::channel();
        let progress = client.submit(request(url), Box::new(move |r| tx.send(r).unwrap()));
        std::thread::sleep(Duration::from_millis(100));
        progress.cancel();
        assert!(matches!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Err(HttpError::Cancelled)));
        assert_eq!(client.in_flight(), 0);
    }
}
