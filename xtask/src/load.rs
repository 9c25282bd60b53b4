//! The benchmarks' load generator: many keep-alive HTTP/1.1 connections
//! driven from one thread, the way `wrk` drives them.
//!
//! The bench measures servers on the machine that also runs the clients,
//! so what the clients cost is taken from the servers. One OS thread per
//! connection with a general-purpose client (ureq) cost 36% of the 2-core
//! machine at 256 connections (perf: buffer copies, allocation, and a
//! context switch per answer), which is why it is not used here. One
//! event-loop thread writes prebuilt requests and reads answers into a
//! buffer each connection reuses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::Credentials;

/// Where load goes: an address, TLS for an `https://` endpoint (checked
/// against the cluster's CA), and the token every request carries.
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    authorization: Option<String>,
}

impl Endpoint {
    /// Plain HTTP without a token (etcd).
    pub fn plain(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            tls: None,
            authorization: None,
        }
    }

    /// `endpoint` (`https://ip:port` or `http://ip:port`) with `creds`' CA
    /// and token.
    pub fn parse(endpoint: &str, creds: &Credentials) -> Result<Endpoint> {
        let (tls, hostport) = match endpoint.split_once("://") {
            Some(("https", rest)) => (Some(creds.tls()?), rest),
            Some(("http", rest)) => (None, rest),
            _ => bail!("endpoint {endpoint} is not https://ip:port or http://ip:port"),
        };
        let addr = hostport
            .trim_end_matches('/')
            .parse()
            .with_context(|| format!("endpoint {endpoint} is not https://ip:port"))?;
        Ok(Endpoint {
            addr,
            tls,
            authorization: creds.authorization(),
        })
    }
}

/// One request, already serialized.
pub struct Request(Vec<u8>);

impl Request {
    /// `method path` to `to`, with `body` (and its content type) if any.
    pub fn new(method: &str, to: &Endpoint, path: &str, body: Option<(&str, &[u8])>) -> Request {
        let mut r = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\n", to.addr);
        if let Some(auth) = &to.authorization {
            r.push_str(&format!("authorization: {auth}\r\n"));
        }
        if let Some((content_type, body)) = body {
            r.push_str(&format!(
                "content-type: {content_type}\r\ncontent-length: {}\r\n",
                body.len()
            ));
        }
        r.push_str("\r\n");
        let mut bytes = r.into_bytes();
        if let Some((_, body)) = body {
            bytes.extend_from_slice(body);
        }
        Request(bytes)
    }
}

/// raft-kv's `PUT /v1/kv/{key}` of `value`.
pub fn raft_kv_put(to: &Endpoint, key: &str, value: &str) -> Request {
    let body = ("application/octet-stream", value.as_bytes());
    Request::new("PUT", to, &format!("/v1/kv/{key}"), Some(body))
}

/// Drives `clients` connections to `to` until each is told to stop.
/// Connection `c` sends `next(c, i)` for i = 1, 2, ... (stopping at the
/// first `None`), waiting for each answer before the next request, and
/// reports each as `answered(c, status, latency)`: `None` for a request
/// that failed or was not answered within `timeout`, after which the
/// connection is opened again.
///
/// All connections run on the calling thread: `next` and `answered` are
/// never called concurrently.
pub fn drive(
    to: &Endpoint,
    clients: usize,
    timeout: Duration,
    next: impl Fn(usize, u64) -> Option<Request>,
    answered: impl Fn(usize, Option<u16>, Duration),
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("load generator runtime")?;
    rt.block_on(async {
        let mut conns = Vec::with_capacity(clients);
        for _ in 0..clients {
            conns.push(connect(to).await?);
        }
        let (next, answered) = (&next, &answered);
        let mut all: FuturesUnordered<_> = conns
            .into_iter()
            .enumerate()
            .map(|(c, conn)| async move {
                let mut conn = Some(conn);
                let mut buf = Vec::with_capacity(4096);
                let mut i = 0;
                while let Some(req) = next(c, i + 1) {
                    i += 1;
                    let stream = match conn.as_mut() {
                        Some(s) => s,
                        None => match connect(to).await {
                            Ok(s) => conn.insert(s),
                            Err(_) => {
                                answered(c, None, Duration::ZERO);
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        },
                    };
                    let t = Instant::now();
                    match tokio::time::timeout(timeout, call(stream, &req, &mut buf)).await {
                        Ok(Ok(answer)) => {
                            answered(c, Some(answer.status), t.elapsed());
                            if answer.close {
                                conn = None;
                            }
                        }
                        Ok(Err(_)) | Err(_) => {
                            answered(c, None, t.elapsed());
                            conn = None;
                        }
                    }
                }
            })
            .collect();
        while all.next().await.is_some() {}
        Ok(())
    })
}

/// A connection, plain or TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

async fn connect(to: &Endpoint) -> Result<Box<dyn Stream>> {
    let addr = to.addr;
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    let Some(tls) = &to.tls else {
        return Ok(Box::new(s));
    };
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let s = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, s)
        .await
        .with_context(|| format!("TLS handshake with {addr}"))?;
    Ok(Box::new(s))
}

/// The parts of an answer the load generator looks at.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    /// The server closes the connection after this answer.
    close: bool,
}

/// Sends `req` and reads its whole answer into `buf`.
async fn call(stream: &mut Box<dyn Stream>, req: &Request, buf: &mut Vec<u8>) -> Result<Answer> {
    stream.write_all(&req.0).await?;
    // A TLS stream may hold the records it encrypted (when the socket's
    // write was refused, as tokio does once a task has used its budget of
    // I/O: 256 connections on one task do) until it is flushed; unflushed,
    // the request waits for the server's header timeout.
    stream.flush().await?;
    buf.clear();
    loop {
        if let Some(parsed) = parse(buf)? {
            return Ok(parsed);
        }
        if buf.len() > 16 << 20 {
            bail!("answer larger than 16 MiB");
        }
        buf.reserve(4096);
        if stream.read_buf(buf).await? == 0 {
            bail!("connection closed mid-answer");
        }
    }
}

/// The answer in `buf` once all of it (head and body) is there.
fn parse(buf: &[u8]) -> Result<Option<Answer>> {
    let Some(head_len) = find(buf, b"\r\n\r\n").map(|i| i + 4) else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_len]).context("answer head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let (mut length, mut chunked, mut close) = (None, false, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().context("bad content-length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let answer = Answer { status, close };
    let body = &buf[head_len..];
    let complete = if chunked {
        chunked_complete(body)?
    } else {
        body.len() >= length.unwrap_or(0)
    };
    Ok(complete.then_some(answer))
}

/// Whether `body` holds a whole chunked body (trailers included).
fn chunked_complete(mut body: &[u8]) -> Result<bool> {
    loop {
        let Some(eol) = find(body, b"\r\n") else {
            return Ok(false);
        };
        let size_field = std::str::from_utf8(&body[..eol]).context("bad chunk size")?;
        let size_hex = size_field.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).context("bad chunk size")?;
        body = &body[eol + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            return Ok(body.starts_with(b"\r\n") || find(body, b"\r\n\r\n").is_some());
        }
        if body.len() < size + 2 {
            return Ok(false);
        }
        body = &body[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Sorted latencies' `p` quantile in milliseconds (0 if there are none).
pub fn quantile_ms(sorted_us: &[u32], p: f64) -> f64 {
    raft_core::sim::quantile(sorted_us, p).unwrap_or(0) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_only_once_whole() {
        let whole = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        for cut in 0..whole.len() {
            assert_eq!(parse(&whole[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(
            parse(whole).unwrap(),
            Some(Answer {
                status: 200,
                close: false
            })
        );
        let empty = b"HTTP/1.1 404 Not Found\r\nconnection: close\r\n\r\n";
        assert_eq!(
            parse(empty).unwrap(),
            Some(Answer {
                status: 404,
                close: true
            })
        );
    }

    #[test]
    fn chunked_answers_end_at_the_last_chunk() {
        let whole = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\n\r\n";
        for cut in 0..whole.len() {
            assert_eq!(parse(&whole[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(parse(whole).unwrap().map(|a| a.status), Some(200));
        let trailer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx-t: 1\r\n\r\n";
        assert_eq!(parse(trailer).unwrap().map(|a| a.status), Some(200));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n").is_err());
    }

    #[test]
    fn requests_carry_length_and_type_only_with_a_body() {
        let addr = Endpoint::plain("127.0.0.1:7301".parse().unwrap());
        let get = Request::new("GET", &addr, "/v1/kv/a", None);
        assert_eq!(
            get.0,
            b"GET /v1/kv/a HTTP/1.1\r\nhost: 127.0.0.1:7301\r\n\r\n"
        );
        let creds = Credentials {
            ca_pem: None,
            token: Some("rkv.t.00".into()),
        };
        let with_token = Endpoint::parse("http://127.0.0.1:7301", &creds).unwrap();
        assert_eq!(
            Request::new("GET", &with_token, "/", None).0,
            b"GET / HTTP/1.1\r\nhost: 127.0.0.1:7301\r\nauthorization: Bearer rkv.t.00\r\n\r\n"
        );
        let put = Request::new("PUT", &addr, "/v1/kv/a", Some(("text/plain", b"vv")));
        assert_eq!(
            put.0,
            b"PUT /v1/kv/a HTTP/1.1\r\nhost: 127.0.0.1:7301\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nvv"
        );
    }
}
