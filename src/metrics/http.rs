//! The metrics endpoint: a minimal HTTP/1.1 server on shard 0's executor serving `GET /metrics`
//! (Prometheus text exposition 0.0.4), `GET /healthz` and `GET /readyz`, plus the recorder's
//! upkeep timer. No tokio and no HTTP crate: the exporter renders, this file only frames.
//!
//! Every resource is bounded, because the endpoint shares a core with a data-path shard:
//! at most [`CONNECTIONS_MAX`] connections are served at once (further ones wait in the kernel's
//! backlog, costing nothing here); a request head is at most [`REQUEST_HEAD_BYTES_MAX`] bytes and
//! must arrive within [`READ_TIMEOUT`]; a response must be taken within [`WRITE_TIMEOUT`]; every
//! connection is closed after one response (`Connection: close`), so there is no keep-alive state.
//! Rendering runs on the executor's blocking thread (`spawn_blocking`), not on the shard's event
//! loop: at the largest label cardinality (64 shards) one render takes tens of milliseconds, a
//! stall shard 0's data path must not see. A render is reused while no shard has published since
//! and it is younger than [`RENDER_REUSE_MAX`], and one render runs at a time, so a burst of
//! scrapes costs one render.

use super::{generation, HTTP_REQUESTS, LABEL_CODE, READY};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Semaphore;
use glommio::timer::{sleep, timeout};
use glommio::GlommioError;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::PrometheusHandle;
use std::cell::RefCell;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connections served at once.
pub const CONNECTIONS_MAX: u64 = 16;
/// Request line plus headers; larger heads get 431.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 << 10;
/// Time for the whole request head to arrive (a slow-drip client cannot hold a slot longer).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for the whole response to be written.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the response, how long unread request bytes are drained before the close, so that the
/// kernel does not answer them with a reset that could destroy the response in flight.
pub const LINGER_TIMEOUT: Duration = Duration::from_millis(500);
/// How often [`upkeep_loop`] runs the recorder's upkeep.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// A render is reused for at most this long.
pub const RENDER_REUSE_MAX: Duration = Duration::from_secs(1);
/// Pause after an accept error that is not transient (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The exposition format Prometheus negotiates by default.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

const _: () = {
    assert!(CONNECTIONS_MAX >= 1);
    assert!(REQUEST_HEAD_BYTES_MAX >= 1024);
};

/// Liveness and readiness as the endpoint reports them. Shared by the runtime (which moves it
/// through ready and stopping) and the server (which only reads it).
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    stopping: AtomicBool,
}

impl Health {
    pub fn new() -> Health {
        Health::default()
    }

    /// Recovery is done, listeners are bound and every shard runs: `/readyz` answers 200.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
        gauge!(READY).set(if self.is_ready() { 1.0 } else { 0.0 });
    }

    /// Shutdown has begun: `/readyz` answers 503 from now on, so load balancers drain first.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
        gauge!(READY).set(0.0);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.stopping.load(Ordering::Acquire)
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// Bind the metrics address from the parent thread, before the executors start, so that a busy
/// port fails start-up with a clear error. Unlike `glommio::net::TcpListener::bind` this does not
/// set `SO_REUSEPORT`: a second instance on the same address must fail rather than silently
/// take half of the scrapes.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr)
}

/// Wrap a listener from [`bind`] for [`serve`]. Call it on the executor that will serve.
pub fn on_executor(listener: std::net::TcpListener) -> TcpListener {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: `into_raw_fd` hands over ownership of a bound, listening TCP socket; nothing else
    // holds or closes the descriptor, and glommio's listener closes it when dropped.
    unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) }
}

/// Run the recorder's upkeep every [`UPKEEP_INTERVAL`], forever. Spawn it on shard 0 next to
/// [`serve`]; without it the exporter's histogram buffers grow without bound.
pub async fn upkeep_loop(handle: PrometheusHandle) {
    loop {
        sleep(UPKEEP_INTERVAL).await;
        handle.run_upkeep();
    }
}

/// Serve the endpoint on `listener` forever. Spawn it as a task on shard 0's executor; it ends
/// with the executor.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, health: Arc<Health>) {
    let slots = Rc::new(Semaphore::new(CONNECTIONS_MAX));
    let state = Rc::new(Server {
        handle,
        health,
        cache: RefCell::new(RenderCache::default()),
        render_slot: Semaphore::new(1),
    });
    loop {
        // Taking the slot before `accept` leaves excess connections in the kernel's backlog.
        let permit = match slots.acquire_static_permit(1).await {
            Ok(p) => p,
            Err(_) => return, // the semaphore is never closed
        };
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                if !is_transient_accept_error(&e) {
                    log::warn!(
                        "metrics endpoint: accept failed: {e}; retrying in {ACCEPT_BACKOFF:?}"
                    );
                    sleep(ACCEPT_BACKOFF).await;
                }
                continue;
            }
        };
        let state = state.clone();
        glommio::spawn_local(async move {
            let _permit = permit;
            if let Err(e) = state.connection(stream).await {
                log::debug!("metrics endpoint: connection ended: {e}");
            }
        })
        .detach();
    }
}

fn is_transient_accept_error(e: &GlommioError<()>) -> bool {
    let errno = match e {
        GlommioError::IoError(io) | GlommioError::EnhancedIoError { source: io, .. } => {
            io.raw_os_error()
        }
        _ => None,
    };
    matches!(
        errno,
        Some(libc::ECONNABORTED | libc::EINTR | libc::EAGAIN | libc::EPROTO)
    )
}

struct Server {
    handle: PrometheusHandle,
    health: Arc<Health>,
    cache: RefCell<RenderCache>,
    /// One render at a time: later scrapes wait for it and reuse its result.
    render_slot: Semaphore,
}

#[derive(Default)]
struct RenderCache {
    body: Rc<String>,
    generation: u64,
    at: Option<Instant>,
}

/// A parsed request: only what routing needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub head_only: bool,
    /// The path without its query string.
    pub path: &'a [u8],
}

/// Why a request head was refused, with the status it is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// 400: not a request line / header block this server understands.
    Malformed,
    /// 405: a method other than GET or HEAD.
    Method,
    /// 505: not HTTP/1.0 or HTTP/1.1.
    Version,
    /// 431: no end of head within `REQUEST_HEAD_BYTES_MAX`.
    TooLarge,
}

impl HeadError {
    pub fn status(self) -> u16 {
        match self {
            HeadError::Malformed => 400,
            HeadError::Method => 405,
            HeadError::Version => 505,
            HeadError::TooLarge => 431,
        }
    }
}

/// The offset just past the blank line ending a request head, if `buf` holds one.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    // Bare LF line ends are tolerated (RFC 9112 §2.2), so look for LF (CR) LF.
    let mut i = 0;
    while let Some(off) = memchr::memchr(b'\n', &buf[i..]) {
        let lf = i + off;
        match buf.get(lf + 1) {
            Some(b'\n') => return Some(lf + 2),
            Some(b'\r') if buf.get(lf + 2) == Some(&b'\n') => return Some(lf + 3),
            _ => i = lf + 1,
        }
    }
    None
}

/// Parse a complete request head (as delimited by [`head_end`]).
pub fn parse_head(head: &[u8]) -> Result<Request<'_>, HeadError> {
    // A server should ignore empty lines before the request line (RFC 9112 §2.2).
    let start = head
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .ok_or(HeadError::Malformed)?;
    let mut lines = head[start..]
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let line = lines.next().ok_or(HeadError::Malformed)?;
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed);
    };
    if method.is_empty() || !method.iter().all(u8::is_ascii_uppercase) {
        return Err(HeadError::Malformed);
    }
    if !target.starts_with(b"/") || target.iter().any(|b| b.is_ascii_control()) {
        return Err(HeadError::Malformed);
    }
    match version {
        b"HTTP/1.1" | b"HTTP/1.0" => {}
        v if v.starts_with(b"HTTP/") => return Err(HeadError::Version),
        _ => return Err(HeadError::Malformed),
    }
    for h in lines {
        if h.is_empty() {
            continue; // the terminating blank line
        }
        // `name: value`, with a non-empty name free of whitespace (RFC 9112 §5.1).
        let colon = h
            .iter()
            .position(|&b| b == b':')
            .ok_or(HeadError::Malformed)?;
        if colon == 0
            || h[..colon]
                .iter()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(HeadError::Malformed);
        }
    }
    let head_only = match method {
        b"GET" => false,
        b"HEAD" => true,
        _ => return Err(HeadError::Method),
    };
    let path = match target.iter().position(|&b| b == b'?') {
        Some(q) => &target[..q],
        None => target,
    };
    Ok(Request { head_only, path })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// Static `code` label values, so counting a request formats nothing.
fn code_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        404 => "404",
        405 => "405",
        408 => "408",
        431 => "431",
        503 => "503",
        505 => "505",
        _ => "other",
    }
}

/// A response: status, content type and body (shared for renders, static otherwise).
struct Response {
    status: u16,
    content_type: &'static str,
    body: Body,
}

enum Body {
    Static(&'static str),
    Shared(Rc<String>),
}

impl Body {
    fn bytes(&self) -> &[u8] {
        match self {
            Body::Static(s) => s.as_bytes(),
            Body::Shared(s) => s.as_bytes(),
        }
    }
}

fn text(status: u16, body: &'static str) -> Response {
    Response {
        status,
        content_type: TEXT_CONTENT_TYPE,
        body: Body::Static(body),
    }
}

fn io_err(e: io::Error) -> GlommioError<()> {
    GlommioError::IoError(e)
}

impl Server {
    async fn connection(&self, mut stream: TcpStream) -> io::Result<()> {
        // The header and body go out as two writes; without this, Nagle would hold the body
        // until the client's delayed ACK of the header (~40 ms).
        stream.set_nodelay(true)?;
        let mut buf = vec![0u8; REQUEST_HEAD_BYTES_MAX];
        let read = timeout(READ_TIMEOUT, async {
            let (mut len, mut from) = (0, 0);
            loop {
                if let Some(end) = head_end(&buf[from..len]) {
                    return Ok(Ok(from + end));
                }
                // The terminator may straddle two reads: re-scan the last bytes next time.
                from = len.saturating_sub(3);
                if len == buf.len() {
                    return Ok(Err(HeadError::TooLarge));
                }
                let n = stream.read(&mut buf[len..]).await.map_err(io_err)?;
                if n == 0 {
                    return Err(io_err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed before a full request head",
                    )));
                }
                len += n;
            }
        })
        .await;
        let (response, head_only) = match read {
            Ok(Ok(end)) => match parse_head(&buf[..end]) {
                Ok(req) => (self.route(req).await, req.head_only),
                Err(e) => (text(e.status(), "bad request\n"), false),
            },
            Ok(Err(e)) => (text(e.status(), "request head too large\n"), false),
            Err(GlommioError::TimedOut(_)) => (text(408, "request timeout\n"), false),
            Err(GlommioError::IoError(e)) => return Err(e),
            Err(e) => return Err(io::Error::other(e.to_string())),
        };
        counter!(HTTP_REQUESTS, LABEL_CODE => code_label(response.status)).increment(1);
        self.respond(&mut stream, &response, head_only).await?;
        // Half-close, then drain what the client may still send, so the close is not a reset.
        stream.shutdown(Shutdown::Write).await?;
        let _ = timeout(LINGER_TIMEOUT, async {
            let mut drained = 0usize;
            while drained < REQUEST_HEAD_BYTES_MAX * 8 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
            Ok(())
        })
        .await;
        Ok(())
    }

    async fn route(&self, req: Request<'_>) -> Response {
        match req.path {
            b"/metrics" => Response {
                status: 200,
                content_type: METRICS_CONTENT_TYPE,
                body: Body::Shared(self.render().await),
            },
            b"/healthz" => text(200, "ok\n"),
            b"/readyz" if self.health.is_ready() => text(200, "ready\n"),
            b"/readyz" if self.health.is_stopping() => text(503, "stopping\n"),
            b"/readyz" => text(503, "not ready\n"),
            _ => text(404, "not found: try /metrics, /healthz or /readyz\n"),
        }
    }

    /// The current exposition, re-rendered only when something was published since the last
    /// render or that render is older than `RENDER_REUSE_MAX`.
    async fn render(&self) -> Rc<String> {
        // The semaphore is never closed, so the permit is always granted.
        let _slot = self.render_slot.acquire_permit(1).await;
        let gen = generation();
        {
            let c = self.cache.borrow();
            if c.at
                .is_some_and(|at| c.generation == gen && at.elapsed() < RENDER_REUSE_MAX)
            {
                return c.body.clone();
            }
        }
        let handle = self.handle.clone();
        let body = Rc::new(
            glommio::executor()
                .spawn_blocking(move || handle.render())
                .await,
        );
        let mut c = self.cache.borrow_mut();
        c.body = body.clone();
        c.generation = gen;
        c.at = Some(Instant::now());
        body
    }

    async fn respond(
        &self,
        stream: &mut TcpStream,
        r: &Response,
        head_only: bool,
    ) -> io::Result<()> {
        let body = r.body.bytes();
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            r.status,
            reason(r.status),
            r.content_type,
            body.len()
        );
        if r.status == 405 {
            head.push_str("Allow: GET, HEAD\r\n");
        }
        head.push_str("\r\n");
        let sent = timeout(WRITE_TIMEOUT, async {
            stream.write_all(head.as_bytes()).await.map_err(io_err)?;
            if !head_only {
                stream.write_all(body).await.map_err(io_err)?;
            }
            stream.flush().await.map_err(io_err)
        })
        .await;
        match sent {
            Ok(()) => Ok(()),
            Err(GlommioError::IoError(e)) => Err(e),
            Err(e) => Err(io::Error::new(io::ErrorKind::TimedOut, e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_finds_crlf_and_lf_terminators() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_end(b""), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nextra"), Some(18));
    }

    #[test]
    fn parses_get_and_head_and_strips_the_query() {
        let r = parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n").unwrap();
        assert_eq!(
            r,
            Request {
                head_only: false,
                path: b"/metrics"
            }
        );
        let r = parse_head(b"\r\nHEAD /readyz HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(
            r,
            Request {
                head_only: true,
                path: b"/readyz"
            }
        );
    }

    #[test]
    fn refuses_what_it_does_not_speak() {
        assert_eq!(
            parse_head(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Err(HeadError::Method)
        );
        assert_eq!(
            parse_head(b"GET /metrics HTTP/2.0\r\n\r\n"),
            Err(HeadError::Version)
        );
        assert_eq!(
            parse_head(b"GET /metrics\r\n\r\n"),
            Err(HeadError::Malformed)
        );
        assert_eq!(
            parse_head(b"GET  /metrics HTTP/1.1\r\n\r\n"),
            Err(HeadError::Malformed)
        );
        assert_eq!(
            parse_head(b"GET http://h/metrics HTTP/1.1\r\n\r\n"),
            Err(HeadError::Malformed)
        );
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n"),
            Err(HeadError::Malformed)
        );
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nBad Name: v\r\n\r\n"),
            Err(HeadError::Malformed)
        );
        assert_eq!(
            parse_head(b"get /metrics HTTP/1.1\r\n\r\n"),
            Err(HeadError::Malformed)
        );
        assert_eq!(parse_head(b"\r\n\r\n"), Err(HeadError::Malformed));
    }

    #[test]
    fn health_moves_through_ready_and_stopping() {
        let h = Health::new();
        assert!(!h.is_ready());
        h.set_ready();
        assert!(h.is_ready());
        h.set_stopping();
        assert!(!h.is_ready());
        assert!(h.is_stopping());
    }
}
