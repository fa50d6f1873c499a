//! The `/metrics` endpoint: a deliberately small HTTP/1.1 responder on tokio. One request per
//! connection (`Connection: close`), `GET` or `HEAD` of `/metrics` only, request heads of at
//! most 8 KiB read within 5 s; anything else gets its HTTP status and the connection closes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The OpenMetrics text format that `prometheus-client` writes (what Prometheus asks for).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic text format, for clients that do not ask for OpenMetrics.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` for the endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves scrapes until `shutdown` turns true.
pub async fn serve(listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    if let Err(e) = answer(stream).await {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads one request head (up to the blank line).
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

/// What a request head asks for: `(status, reason, with_body, is_the_metrics_page)`.
fn route(head: &[u8]) -> (u16, &'static str, bool, bool) {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next());
    let path = target.map(|t| t.split(|&b| b == b'?').next().unwrap_or_default());
    match (method, path) {
        (b"GET" | b"HEAD", Some(b"/metrics")) => (200, "OK", method == b"GET", true),
        (b"GET" | b"HEAD", Some(_)) => (404, "Not Found", true, false),
        (_, Some(_)) => (405, "Method Not Allowed", true, false),
        _ => (400, "Bad Request", true, false),
    }
}

async fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => {
            return respond(
                &mut stream,
                400,
                "Bad Request",
                "text/plain",
                b"bad request\n",
            )
            .await;
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    let (status, reason, with_body, metrics) = route(&head);
    if !metrics {
        let body = format!("{status} {reason}; the metrics are at /metrics\n");
        return respond(&mut stream, status, reason, "text/plain", body.as_bytes()).await;
    }
    let open_metrics = wants_open_metrics(&head);
    let encoded = if open_metrics {
        super::global().encode()
    } else {
        super::global().encode_classic()
    };
    let text = match encoded {
        Ok(t) => t,
        Err(_) => {
            return respond(
                &mut stream,
                500,
                "Internal Server Error",
                "text/plain",
                b"encoding failed\n",
            )
            .await;
        }
    };
    let body = if with_body { text.as_bytes() } else { &[] };
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        if open_metrics {
            CONTENT_TYPE
        } else {
            CLASSIC_CONTENT_TYPE
        },
        text.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// Whether the request's `Accept` header names OpenMetrics (Prometheus' scraper does).
fn wants_open_metrics(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    text.lines().any(|l| {
        l.strip_prefix("accept:")
            .is_some_and(|v| v.contains("application/openmetrics-text"))
    })
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    reason: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    stream.write_all(&out).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::{route, wants_open_metrics};

    #[test]
    fn negotiates_the_format_by_accept() {
        assert!(wants_open_metrics(
            b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n"
        ));
        assert!(!wants_open_metrics(
            b"GET /metrics HTTP/1.1\r\nAccept: */*\r\n\r\n"
        ));
    }

    #[test]
    fn routes_only_get_and_head_of_metrics() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\n\r\n"),
            (200, "OK", true, true)
        );
        assert_eq!(
            route(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"),
            (200, "OK", true, true)
        );
        assert_eq!(
            route(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            (200, "OK", false, true)
        );
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n").0, 404);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n").0, 405);
        assert_eq!(route(b"\r\n\r\n").0, 400);
    }
}
