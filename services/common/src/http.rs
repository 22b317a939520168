//! A small HTTP/1.1 server over `std::net::TcpListener`: one thread per connection (bounded), one
//! request per connection, bounded request head and body, read and write timeouts.
//!
//! The services answer a few small JSON requests, so a hand-written server keeps their build
//! fast and their binaries small; the limits keep a slow or hostile client from holding threads
//! or memory.

use crate::{info, warn};
use serde::Serialize;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// The largest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The most connections served at once; more are answered 503 straight away.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request or read the response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for requests in progress.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A failure to start or run the server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("listen on {addr}: {error}")]
    Bind { addr: SocketAddr, error: io::Error },
    #[error("wake the listener on {addr} to shut down: {error}")]
    Wake { addr: SocketAddr, error: io::Error },
}

/// A parsed request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The request target as sent, such as `/status?verbose=1`.
    pub target: String,
    /// Header names lowercased, values trimmed, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
}

impl Request {
    /// Whether this is a GET, or a HEAD that the server answers like a GET without the body.
    pub fn is_get(&self) -> bool {
        self.method == "GET" || self.method == "HEAD"
    }

    /// The target without its query string.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(path, _)| path)
    }
}

/// A response; always sent with `Content-Length` and `Connection: close`.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Extra headers, such as `Allow` on a 405.
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    /// A JSON response.
    pub fn json<T: Serialize>(status: u16, value: &T) -> Response {
        match serde_json::to_vec_pretty(value) {
            Ok(mut body) => {
                body.push(b'\n');
                Response { status, content_type: "application/json", body, headers: Vec::new() }
            }
            // Serialising the services' own plain structs cannot fail; answer 500 rather than
            // panic if that ever changes.
            Err(e) => Response::text(500, &format!("serialise response: {e}")),
        }
    }

    /// A plain-text response; a newline is appended.
    pub fn text(status: u16, text: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{text}\n").into_bytes(),
            headers: Vec::new(),
        }
    }

    /// 404 for a path the service does not serve.
    pub fn not_found(path: &str) -> Response {
        Response::text(404, &format!("no such resource: {path}"))
    }

    /// 405 with the methods the path accepts.
    pub fn method_not_allowed(allow: &str) -> Response {
        let mut response = Response::text(405, &format!("method not allowed; allowed: {allow}"));
        response.headers.push(("Allow", allow.to_owned()));
        response
    }
}

/// A bound listener, ready to serve.
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// Stops a [`Server`] from another thread (the signal handler's).
#[derive(Clone)]
pub struct Stopper {
    stopping: Arc<AtomicBool>,
    wake: SocketAddr,
}

impl Server {
    /// Binds `addr`; port 0 picks a free port, reported by [`Server::local_addr`].
    pub fn bind(addr: SocketAddr) -> Result<Server, HttpError> {
        let listener = TcpListener::bind(addr).map_err(|error| HttpError::Bind { addr, error })?;
        let local_addr = listener.local_addr().map_err(|error| HttpError::Bind { addr, error })?;
        Ok(Server { listener, local_addr, stopping: Arc::new(AtomicBool::new(false)), tls: None })
    }

    /// Serves over TLS with `config` (see [`crate::tls::server_config`], which requires a
    /// client certificate from the cluster CA) instead of plain TCP.
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Server {
        self.tls = Some(config);
        self
    }

    /// The address actually listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that makes [`Server::serve`] return.
    pub fn stopper(&self) -> Stopper {
        Stopper { stopping: Arc::clone(&self.stopping), wake: wake_addr(self.local_addr) }
    }

    /// Serves requests until stopped, then waits briefly for requests in progress.
    pub fn serve<H>(self, handler: H)
    where
        H: Fn(&Request) -> Response + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        let active = Arc::new(AtomicUsize::new(0));
        for conn in self.listener.incoming() {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let stream = match conn {
                Ok(stream) => stream,
                Err(e) => {
                    warn!("accept a connection on {}: {e}", self.local_addr);
                    // Running out of file descriptors fails every accept at once; pausing keeps
                    // the loop from spinning until connections close.
                    thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                busy(stream);
                continue;
            }
            let guard = ActiveGuard::new(&active);
            let handler = Arc::clone(&handler);
            let tls = self.tls.clone();
            let spawned = thread::Builder::new().name("http".to_owned()).spawn(move || {
                let _guard = guard;
                handle_connection(stream, &*handler, tls);
            });
            if let Err(e) = spawned {
                warn!("start a thread for a connection: {e}");
            }
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        info!("stopped listening on {}", self.local_addr);
    }
}

impl Stopper {
    /// Makes the server stop accepting: sets the flag, then connects once to wake the blocked
    /// `accept` so that it sees the flag.
    pub fn stop(&self) -> Result<(), HttpError> {
        self.stopping.store(true, Ordering::SeqCst);
        match TcpStream::connect_timeout(&self.wake, Duration::from_secs(1)) {
            Ok(_) => Ok(()),
            Err(error) => Err(HttpError::Wake { addr: self.wake, error }),
        }
    }
}

/// Counts a connection in progress until dropped, even if its thread never starts.
struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    fn new(active: &Arc<AtomicUsize>) -> ActiveGuard {
        active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(Arc::clone(active))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The address to connect to in order to reach a listener: a wildcard address is reached over
/// the loopback address of the same family.
fn wake_addr(local: SocketAddr) -> SocketAddr {
    let mut addr = local;
    if addr.ip().is_unspecified() {
        match addr {
            SocketAddr::V4(_) => addr.set_ip(Ipv4Addr::LOCALHOST.into()),
            SocketAddr::V6(_) => addr.set_ip(Ipv6Addr::LOCALHOST.into()),
        }
    }
    addr
}

fn busy(mut stream: TcpStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let _ = write_response(&mut stream, &Response::text(503, "too many connections"), false);
    warn!("refused a connection: {MAX_CONNECTIONS} connections in progress");
}

fn handle_connection(
    mut stream: TcpStream,
    handler: &dyn Fn(&Request) -> Response,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let started = Instant::now();
    let peer = match stream.peer_addr() {
        Ok(peer) => peer,
        // The client has already gone; there is no one to answer.
        Err(_) => return,
    };
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    match tls {
        None => exchange(&mut stream, peer, handler, started),
        Some(config) => {
            let mut conn = match rustls::ServerConnection::new(config) {
                Ok(conn) => conn,
                Err(e) => {
                    warn!("{peer}: start a TLS session: {e}");
                    return;
                }
            };
            // The handshake is completed before anything is read, so that a client without a
            // certificate from the cluster CA is refused (and logged) before it can send a
            // request.
            while conn.is_handshaking() {
                if let Err(e) = conn.complete_io(&mut stream) {
                    warn!("{peer}: TLS handshake refused: {e}");
                    return;
                }
            }
            exchange(&mut rustls::Stream::new(&mut conn, &mut stream), peer, handler, started);
            conn.send_close_notify();
            let _ = conn.complete_io(&mut stream);
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Reads one request, answers it and logs the exchange, over plain TCP or TLS.
fn exchange<S: Read + Write>(
    stream: &mut S,
    peer: SocketAddr,
    handler: &dyn Fn(&Request) -> Response,
    started: Instant,
) {
    let (request, response) = match read_request(stream, peer) {
        Ok(request) => {
            let response = handler(&request);
            (Some(request), response)
        }
        Err(RequestError::Closed) => return,
        Err(RequestError::Bad(status, reason)) => (None, Response::text(status, &reason)),
    };
    let head_only = request.as_ref().is_some_and(|r| r.method == "HEAD");
    let result = write_response(stream, &response, head_only);
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let line = match &request {
        Some(r) => format!("{} {}", r.method, r.target),
        None => "(unparsable request)".to_owned(),
    };
    match result {
        Ok(()) => info!(
            "{peer} \"{line}\" {} {}B {elapsed_ms:.1}ms",
            response.status,
            response.body.len()
        ),
        Err(e) => warn!("{peer} \"{line}\" {}: write the response: {e}", response.status),
    }
}

enum RequestError {
    /// The client closed the connection or timed out before sending anything.
    Closed,
    /// A request the server answers with this status and reason.
    Bad(u16, String),
}

fn read_request<S: Read>(stream: &mut S, peer: SocketAddr) -> Result<Request, RequestError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(RequestError::Bad(431, "request head too large".to_owned()));
        }
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err(RequestError::Closed),
            Ok(0) => return Err(RequestError::Bad(400, "incomplete request head".to_owned())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if buf.is_empty() => return Err(RequestError::Closed),
            Err(_) => return Err(RequestError::Bad(408, "request timed out".to_owned())),
        }
    };
    if head_end > MAX_HEAD_BYTES {
        return Err(RequestError::Bad(431, "request head too large".to_owned()));
    }
    let head = String::from_utf8(buf[..head_end].to_vec())
        .map_err(|_| RequestError::Bad(400, "request head is not UTF-8".to_owned()))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Bad(400, "malformed request line".to_owned()));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(RequestError::Bad(505, format!("unsupported version {version}")));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) || target.is_empty() {
        return Err(RequestError::Bad(400, "malformed request line".to_owned()));
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(RequestError::Bad(400, "malformed header line".to_owned()));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    if headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return Err(RequestError::Bad(501, "transfer-encoding is not supported".to_owned()));
    }
    let length = match headers.iter().find(|(n, _)| n == "content-length") {
        Some((_, v)) => v
            .parse::<usize>()
            .map_err(|_| RequestError::Bad(400, "malformed content-length".to_owned()))?,
        None => 0,
    };
    if length > MAX_BODY_BYTES {
        return Err(RequestError::Bad(413, "request body too large".to_owned()));
    }
    let mut body = buf.split_off(head_end + 4);
    if body.len() > length {
        return Err(RequestError::Bad(400, "more data than content-length".to_owned()));
    }
    let already = body.len();
    body.resize(length, 0);
    stream
        .read_exact(&mut body[already..])
        .map_err(|_| RequestError::Bad(408, "request body incomplete".to_owned()))?;
    Ok(Request { method: method.to_owned(), target: target.to_owned(), headers, body, peer })
}

fn write_response<S: Write>(
    stream: &mut S,
    response: &Response,
    head_only: bool,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    for (name, value) in &response.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if !head_only {
        bytes.extend_from_slice(&response.body);
    }
    stream.write_all(&bytes)?;
    stream.flush()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client;

    /// Starts a server on an ephemeral loopback port; stops it and waits for it when dropped.
    struct Running {
        addr: SocketAddr,
        stopper: Stopper,
        thread: Option<thread::JoinHandle<()>>,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.stopper.stop();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn start() -> Running {
        let server = Server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr();
        let stopper = server.stopper();
        let thread = thread::spawn(move || {
            server.serve(|req: &Request| match (req.method.as_str(), req.path()) {
                (_, "/hello") if req.is_get() => Response::text(200, "hello"),
                ("POST", "/echo") => Response {
                    status: 200,
                    content_type: "application/octet-stream",
                    body: req.body.clone(),
                    headers: Vec::new(),
                },
                (_, "/hello") => Response::method_not_allowed("GET"),
                (_, path) => Response::not_found(path),
            })
        });
        Running { addr, stopper, thread: Some(thread) }
    }

    fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(request).unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_routes_and_statuses() {
        let server = start();
        let addr = server.addr.to_string();
        let ok = client::get(&addr, "/hello?x=1", Duration::from_secs(5)).unwrap();
        assert_eq!((ok.status, ok.body.as_slice()), (200, &b"hello\n"[..]));
        let missing = client::get(&addr, "/nope", Duration::from_secs(5)).unwrap();
        assert_eq!(missing.status, 404);
        let reply = raw(server.addr, b"DELETE /hello HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(reply.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{reply}");
        assert!(reply.contains("\r\nAllow: GET\r\n"), "{reply}");
        let reply = raw(server.addr, b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde");
        assert!(reply.ends_with("\r\n\r\nabcde"), "{reply}");
        let reply = raw(server.addr, b"HEAD /hello HTTP/1.1\r\n\r\n");
        assert!(reply.contains("Content-Length: 6\r\n") && reply.ends_with("\r\n\r\n"), "{reply}");
    }

    #[test]
    fn rejects_bad_and_oversized_requests() {
        let server = start();
        let reply = raw(server.addr, b"GARBAGE\r\n\r\n");
        assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
        let reply = raw(server.addr, b"GET / SPDY/3\r\n\r\n");
        assert!(reply.starts_with("HTTP/1.1 505 "), "{reply}");
        let mut huge = b"GET / HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaa\r\n", 400).flatten());
        huge.extend_from_slice(b"\r\n");
        let reply = raw(server.addr, &huge);
        assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");
        let reply = raw(server.addr, b"POST /echo HTTP/1.1\r\nContent-Length: 999999\r\n\r\n");
        assert!(reply.starts_with("HTTP/1.1 413 "), "{reply}");
        let reply = raw(server.addr, b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(reply.starts_with("HTTP/1.1 501 "), "{reply}");
    }

    #[test]
    fn stop_returns_from_serve() {
        let mut server = start();
        server.stopper.stop().unwrap();
        let started = Instant::now();
        server.thread.take().unwrap().join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(client::get(&server.addr.to_string(), "/hello", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn wildcard_listeners_are_woken_over_loopback() {
        assert_eq!(wake_addr("[::]:80".parse().unwrap()), "[::1]:80".parse().unwrap());
        assert_eq!(wake_addr("0.0.0.0:80".parse().unwrap()), "127.0.0.1:80".parse().unwrap());
        assert_eq!(wake_addr("10.0.0.1:80".parse().unwrap()), "10.0.0.1:80".parse().unwrap());
    }
}
