//! A minimal HTTP/1.1 client, over plain TCP or mutually authenticated TLS, used by the control
//! plane to poll the agents, gather their shares (GET) and record the unlock in etcd (POST).
//!
//! One request per connection with `Connection: close`, an overall deadline, and a bounded
//! response size, so that an unresponsive or misbehaving agent cannot stall the poller.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The largest response accepted.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// A failed request, naming the address it was sent to.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("resolve {address}: {error}")]
    Resolve { address: String, error: io::Error },
    #[error("connect to {address}: {error}")]
    Connect { address: String, error: io::Error },
    #[error("request {path} from {address}: {error}")]
    Io { address: String, path: String, error: io::Error },
    #[error("request {path} from {address}: {reason}")]
    Malformed { address: String, path: String, reason: String },
}

/// A response: status code and body.
#[derive(Debug)]
pub struct ClientResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Sends `GET <path>` to `address` (`host:port`, `[v6]:port`) and reads the whole response
/// within `timeout`.
pub fn get(address: &str, path: &str, timeout: Duration) -> Result<ClientResponse, ClientError> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect(address, deadline)?;
    exchange(&mut stream, address, path, None, deadline)
}

/// Sends `GET <path>` to `address` over TLS with `config` (see [`crate::tls::client_config`]),
/// checking that the server's certificate names `server_name`, and reads the whole response
/// within `timeout`.
pub fn get_tls(
    address: &str,
    server_name: &str,
    path: &str,
    timeout: Duration,
    config: &Arc<rustls::ClientConfig>,
) -> Result<ClientResponse, ClientError> {
    request_tls(address, server_name, path, None, timeout, config)
}

/// Sends `POST <path>` with a JSON `body` to `address` over TLS, like [`get_tls`].
pub fn post_json_tls(
    address: &str,
    server_name: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
    config: &Arc<rustls::ClientConfig>,
) -> Result<ClientResponse, ClientError> {
    request_tls(address, server_name, path, Some(body), timeout, config)
}

fn request_tls(
    address: &str,
    server_name: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
    config: &Arc<rustls::ClientConfig>,
) -> Result<ClientResponse, ClientError> {
    let deadline = Instant::now() + timeout;
    let tcp = connect(address, deadline)?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| malformed(address, path, &format!("server name `{server_name}`: {e}")))?;
    let conn = rustls::ClientConnection::new(Arc::clone(config), name)
        .map_err(|e| malformed(address, path, &format!("start a TLS session: {e}")))?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    exchange(&mut stream, address, path, body, deadline)
}

/// A connection the client can set deadlines on: plain TCP, or TLS over TCP.
trait Socket: Read + Write {
    fn tcp(&self) -> &TcpStream;
}

impl Socket for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Socket for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }
}

fn exchange<S: Socket>(
    stream: &mut S,
    address: &str,
    path: &str,
    body: Option<&[u8]>,
    deadline: Instant,
) -> Result<ClientResponse, ClientError> {
    let io_err =
        |error| ClientError::Io { address: address.to_owned(), path: path.to_owned(), error };
    let head = format!("Host: {address}\r\nConnection: close\r\nAccept: application/json\r\n");
    let mut request = match body {
        None => format!("GET {path} HTTP/1.1\r\n{head}\r\n").into_bytes(),
        Some(body) => format!(
            "POST {path} HTTP/1.1\r\n{head}Content-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes(),
    };
    request.extend_from_slice(body.unwrap_or_default());
    set_timeouts(stream.tcp(), deadline).map_err(io_err)?;
    stream.write_all(&request).map_err(io_err)?;
    stream.flush().map_err(io_err)?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        set_timeouts(stream.tcp(), deadline).map_err(io_err)?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A server that closes without TLS's close_notify after a complete response (the
            // body length is checked below) is not an error.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => break,
            Err(e) => return Err(io_err(e)),
        }
        if raw.len() > MAX_RESPONSE_BYTES {
            return Err(malformed(address, path, "response larger than 1 MiB"));
        }
    }
    parse_response(&raw).map_err(|reason| malformed(address, path, reason))
}

fn connect(address: &str, deadline: Instant) -> Result<TcpStream, ClientError> {
    let addrs: Vec<SocketAddr> = match address.to_socket_addrs() {
        Ok(addrs) => addrs.collect(),
        Err(error) => return Err(ClientError::Resolve { address: address.to_owned(), error }),
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
    for addr in &addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            last = io::Error::new(io::ErrorKind::TimedOut, "timed out");
            break;
        }
        match TcpStream::connect_timeout(addr, left) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(ClientError::Connect { address: address.to_owned(), error: last })
}

/// Limits the next read or write to the time left before `deadline`.
fn set_timeouts(stream: &TcpStream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
    }
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))
}

fn malformed(address: &str, path: &str, reason: &str) -> ClientError {
    ClientError::Malformed {
        address: address.to_owned(),
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

fn parse_response(raw: &[u8]) -> Result<ClientResponse, &'static str> {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err("the response has no complete head");
    };
    let head =
        std::str::from_utf8(&raw[..head_end]).map_err(|_| "the response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err("malformed status line");
    };
    if !version.starts_with("HTTP/1.") {
        return Err("not an HTTP/1 response");
    }
    let status = code.parse::<u16>().map_err(|_| "malformed status code")?;
    let mut body = raw[head_end + 4..].to_vec();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err("malformed header line");
        };
        if name.trim().eq_ignore_ascii_case("content-length") {
            let length = value.trim().parse::<usize>().map_err(|_| "malformed content-length")?;
            if body.len() < length {
                return Err("the response body is shorter than its content-length");
            }
            body.truncate(length);
        }
    }
    Ok(ClientResponse { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn parses_status_and_body() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hi"[..]));
        let r = parse_response(b"HTTP/1.0 503 Busy\r\n\r\nno length").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (503, &b"no length"[..]));
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n").unwrap_err(),
            "the response has no complete head"
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhi").unwrap_err(),
            "the response body is shorter than its content-length"
        );
        assert_eq!(
            parse_response(b"SSH-2.0-OpenSSH_9.2 Debian\r\n\r\n").unwrap_err(),
            "not an HTTP/1 response"
        );
    }

    #[test]
    fn refused_connection_names_the_address() {
        // Binding then dropping a listener leaves a loopback port with nothing listening.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let address = format!("127.0.0.1:{port}");
        let err = get(&address, "/health", Duration::from_secs(2)).unwrap_err().to_string();
        assert!(err.starts_with(&format!("connect to {address}: ")), "{err}");
    }

    #[test]
    fn silent_server_times_out() {
        // A listener that never accepts still completes the TCP handshake, so the client gets
        // as far as waiting for a response and must give up at its deadline.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let started = Instant::now();
        let err = get(&address, "/health", Duration::from_millis(300)).unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        assert!(err.starts_with(&format!("request /health from {address}: ")), "{err}");
    }
}
