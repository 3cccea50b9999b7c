//! A minimal HTTP/1.1 client for HTTP probes: one request per connection (`Connection: close`), plain `http://`
//! only, the body read up to [`MAX_BODY`] bytes. Enough to check a health endpoint's status and body; TLS is out
//! of scope (probe an `https://` service through its plain-HTTP health port, or with an rpc probe).

use std::{fmt, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes of the response kept (status line, headers and body).
pub(crate) const MAX_BODY: usize = 1 << 20;

/// An `http://host[:port]/path` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Url {
    /// Host name or address (IPv6 without brackets).
    pub(crate) host: String,
    /// Port (80 by default).
    pub(crate) port: u16,
    /// Path and query, starting with `/`.
    pub(crate) path: String,
}

impl Url {
    /// Parses `http://host[:port][/path]`.
    ///
    /// # Errors
    /// A message for other schemes and malformed URLs.
    pub(crate) fn parse(s: &str) -> Result<Url, String> {
        let rest = s.strip_prefix("http://").ok_or_else(|| {
            if s.starts_with("https://") {
                format!("`{s}`: only plain http:// is supported (probe the service's plain-HTTP health port)")
            } else {
                format!("`{s}` is not an http:// URL")
            }
        })?;
        let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| format!("`{s}`: unclosed [ in the host"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("`{s}` has no host"));
        }
        let port = match port {
            None => 80,
            Some(p) => p.parse().ok().filter(|p| *p > 0).ok_or_else(|| format!("`{s}`: bad port `{p}`"))?,
        };
        Ok(Url { host: host.to_owned(), port, path: path.to_owned() })
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        write!(f, "http://{host}:{}{}", self.port, self.path)
    }
}

/// A request.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    /// Where.
    pub(crate) url: Url,
    /// Method.
    pub(crate) method: String,
    /// Extra headers.
    pub(crate) headers: std::collections::BTreeMap<String, String>,
    /// Body.
    pub(crate) body: Option<String>,
}

/// A response.
#[derive(Clone, Debug)]
pub(crate) struct Response {
    /// Status code.
    pub(crate) status: u16,
    /// Body (lossy UTF-8, at most [`MAX_BODY`]).
    pub(crate) body: String,
}

/// Sends `req` and reads the response.
///
/// # Errors
/// Connection failures, timeouts and responses that are not HTTP.
pub(crate) async fn send(req: &Request, timeout: Duration) -> Result<Response, String> {
    tokio::time::timeout(timeout, send_inner(req))
        .await
        .map_err(|_| format!("Timeout after {:.3} s", timeout.as_secs_f64()))?
}

async fn send_inner(req: &Request) -> Result<Response, String> {
    let mut stream = tokio::net::TcpStream::connect((req.url.host.as_str(), req.url.port))
        .await
        .map_err(|e| format!("cannot connect to {}:{}: {e}", req.url.host, req.url.port))?;
    let body = req.body.clone().unwrap_or_default();
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: lymph-chaos\r\n",
        req.method, req.url.path, req.url.host
    );
    for (k, v) in &req.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if req.body.is_some() {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.map_err(|e| format!("sending the request: {e}"))?;
    stream.write_all(body.as_bytes()).await.map_err(|e| format!("sending the body: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| format!("reading the response: {e}"))?;
        if n == 0 || buf.len() >= MAX_BODY {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> Result<Response, String> {
    let text = String::from_utf8_lossy(buf);
    let status_line = text.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let status = match (parts.next(), parts.next().and_then(|s| s.parse::<u16>().ok())) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => code,
        _ => return Err(format!("not an HTTP response: {:?}", status_line.chars().take(60).collect::<String>())),
    };
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_owned());
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            Url::parse("http://127.0.0.1:8080/health?x=1").unwrap(),
            Url { host: "127.0.0.1".into(), port: 8080, path: "/health?x=1".into() }
        );
        assert_eq!(Url::parse("http://localhost").unwrap().port, 80);
        assert_eq!(Url::parse("http://[::1]:81/").unwrap().host, "::1");
        assert!(Url::parse("https://x/").unwrap_err().contains("only plain http://"));
        assert!(Url::parse("http://:80/").is_err());
        assert!(Url::parse("http://h:0/").is_err());
    }

    #[test]
    fn responses() {
        let r = parse_response(b"HTTP/1.1 503 Service Unavailable\r\nA: b\r\n\r\ndown").unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "down"));
        assert!(parse_response(b"SSH-2.0-OpenSSH").is_err());
    }

    #[tokio::test]
    async fn a_real_request_on_loopback() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\nok").await.unwrap();
            req
        });
        let url = Url::parse(&format!("http://127.0.0.1:{port}/health")).unwrap();
        let req = Request { url, method: "GET".into(), headers: Default::default(), body: None };
        let resp = send(&req, Duration::from_secs(2)).await.unwrap();
        assert_eq!((resp.status, resp.body.as_str()), (200, "ok"));
        assert!(server.await.unwrap().starts_with("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"));
    }
}
