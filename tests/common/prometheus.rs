//! A throw-away Prometheus server on loopback that scrapes an nbdcrypt metrics endpoint, and
//! PromQL through its HTTP API. Killed on drop, also when the test fails.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Prometheus {
    child: Child,
    pub api: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `prometheus` and `promtool` are installed.
pub fn available() -> Result<(), String> {
    super::have("prometheus")?;
    super::have("promtool")
}

/// `curl`-less HTTP GET on loopback: the body of `http://ADDR/PATH`, or the error.
pub fn http_get(addr: &str, path: &str, accept: &str) -> Result<(String, String), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP head")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{head}\n{body}"));
    }
    Ok((head.to_owned(), body.to_owned()))
}

impl Prometheus {
    /// Starts Prometheus with `scrape_interval: 1s` on `target` (`HOST:PORT`), its data in
    /// `dir`; waits until the target is up.
    pub fn start(dir: &Path, target: &str) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: nbdcrypt\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = super::free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            api: format!("127.0.0.1:{port}"),
        };
        let start = Instant::now();
        loop {
            if p.query("up{job=\"nbdcrypt\"}", None)
                .is_ok_and(|v| v.first().is_some_and(|x| *x == 1.0))
            {
                return p;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "prometheus never scraped {target}:\n{}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// An instant PromQL query (at Unix time `at`, or now): the values of the result vector.
    pub fn query(&self, promql: &str, at: Option<f64>) -> Result<Vec<f64>, String> {
        let mut path = format!("/api/v1/query?query={}", encode(promql));
        if let Some(t) = at {
            path.push_str(&format!("&time={t:.3}"));
        }
        let (_, body) = http_get(&self.api, &path, "application/json")?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        if v["status"] != "success" {
            return Err(body);
        }
        Ok(v["data"]["result"]
            .as_array()
            .ok_or_else(|| body.clone())?
            .iter()
            .filter_map(|r| r["value"][1].as_str()?.parse().ok())
            .collect())
    }
}

/// Percent-encodes a query string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Unix time now, seconds.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
