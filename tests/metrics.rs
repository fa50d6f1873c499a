//! `serve --metrics-listen` under a real scraper: Debian's Prometheus scrapes the endpoint
//! every second during a fio run, and PromQL through Prometheus' HTTP API finds the request
//! rate and the bytes written that fio reports (within 10 %). `promtool check metrics` accepts
//! the endpoint's output; contrib/prometheus's scrape config and alerting rules pass
//! `promtool check config` / `check rules`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::prometheus::{self, Prometheus, http_get};
use common::{Rng, Server, TempDir, export_spec, key_file, peer_available, run_ok, seed};

/// The metrics URL's `HOST:PORT` from the server's log.
fn metrics_addr(server: &Server) -> String {
    let log = server.wait_for_log("metrics endpoint listening");
    let line = log
        .lines()
        .find(|l| l.contains("metrics endpoint listening"))
        .unwrap_or_else(|| panic!("no metrics line in the log:\n{log}"));
    let url = line.split("url=http://").nth(1).unwrap();
    url.split('/').next().unwrap().to_owned()
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut c = Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(c.stdin.take());
    let out = c.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn prometheus_scrapes_what_fio_did() {
    if !peer_available("prometheus + promtool", prometheus::available())
        || !peer_available("fio", common::have("fio"))
    {
        return;
    }
    let dir = TempDir::new("metrics");
    let mut rng = Rng::new(seed("metrics"));
    let (key, _) = key_file(&dir, "k", &mut rng);
    let spec = export_spec(&dir, "m", &key, ",size=256M");
    let server = Server::start_with(&dir, &[spec], &["--metrics-listen", "127.0.0.1:0"]);
    let target = metrics_addr(&server);
    let prom = Prometheus::start(&dir.0, &target);

    let before = prometheus::now();
    // Wait for a scrape after `before`, so the query at `before` sees the idle counters.
    std::thread::sleep(Duration::from_millis(1500));
    let out = run_ok(
        Command::new("fio")
            .current_dir(&dir.0)
            .args([
                "--name=m",
                "--ioengine=nbd",
                "--rw=randrw",
                "--rwmixread=50",
                "--bs=4k",
                "--iodepth=8",
                "--size=128M",
                "--time_based",
                "--runtime=12",
                "--output-format=json",
            ])
            .arg(format!("--uri={}", server.uri("m"))),
    );
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"].as_u64(), Some(0), "{out}");
    let fio_ios =
        job["read"]["total_ios"].as_f64().unwrap() + job["write"]["total_ios"].as_f64().unwrap();
    let fio_written = job["write"]["io_bytes"].as_f64().unwrap();
    let fio_seconds = job["job_runtime"].as_f64().unwrap() / 1000.0;
    let fio_rate = fio_ios / fio_seconds;
    // Two scrapes after fio ended.
    std::thread::sleep(Duration::from_millis(2500));
    let after = prometheus::now();

    let at = |q: &str, t: f64| -> f64 { prom.query(q, Some(t)).unwrap().iter().sum() };
    let requests =
        r#"nbdcrypt_requests_total{job="nbdcrypt",export="m",command=~"read|write",result="ok"}"#;
    let written = r#"nbdcrypt_written_bytes_total{job="nbdcrypt",export="m"}"#;
    let prom_rate = (at(requests, after) - at(requests, before)) / fio_seconds;
    let prom_written = at(written, after) - at(written, before);
    eprintln!(
        "fio: {fio_rate:.0} IOPS, {fio_written} bytes written in {fio_seconds:.1} s; \
         Prometheus: {prom_rate:.0} requests/s, {prom_written} bytes written"
    );
    assert!(fio_ios > 1000.0, "fio did almost nothing: {out}");
    let close = |a: f64, b: f64| (a - b).abs() <= 0.1 * b;
    assert!(
        close(prom_rate, fio_rate),
        "request rate: Prometheus {prom_rate:.0}/s, fio {fio_rate:.0}/s"
    );
    assert!(
        close(prom_written, fio_written),
        "bytes written: Prometheus {prom_written}, fio {fio_written}"
    );
    // A PromQL rate over the run sees requests too (what a dashboard would plot).
    let mid = before + 1.5 + fio_seconds / 2.0;
    let live = at(
        r#"sum(rate(nbdcrypt_requests_total{job="nbdcrypt",command=~"read|write"}[4s]))"#,
        mid,
    );
    assert!(
        live > 0.5 * fio_rate,
        "rate() mid-run {live:.0}/s against fio's {fio_rate:.0}/s"
    );
    // Latency histogram and in-flight gauge were scraped too.
    assert!(
        at(
            r#"nbdcrypt_request_duration_seconds_count{job="nbdcrypt",command="read"}"#,
            after
        ) > 0.0
    );
    assert_eq!(
        at(
            r#"nbdcrypt_requests_in_flight{job="nbdcrypt",export="m"}"#,
            after
        ),
        0.0
    );

    // promtool accepts the endpoint's text (classic format) ...
    let (_, classic) = http_get(&target, "/metrics", "*/*").unwrap();
    let (ok, why) = promtool(&["check", "metrics"], Some(&classic));
    assert!(ok, "promtool check metrics:\n{why}\n{classic}");
    // ... and the OpenMetrics text, which Prometheus asked for, ends as the format requires.
    let (head, open) = http_get(
        &target,
        "/metrics",
        "application/openmetrics-text;version=1.0.0",
    )
    .unwrap();
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(open.ends_with("# EOF\n"));
    drop(prom);
    server.stop();
}

#[test]
fn contrib_scrape_config_and_alert_rules_pass_promtool() {
    if !peer_available("prometheus + promtool", prometheus::available()) {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prometheus");
    let rules = root.join("nbdcrypt-alerts.yml");
    let (ok, why) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(ok, "{why}");
    assert!(why.contains("SUCCESS: 4 rules found"), "{why}");
    // The scrape config names the rules file relative to itself: check it from a copy.
    let dir = TempDir::new("contrib-prom");
    for f in ["prometheus.yml", "nbdcrypt-alerts.yml"] {
        std::fs::copy(root.join(f), dir.path(f)).unwrap();
    }
    let (ok, why) = promtool(
        &[
            "check",
            "config",
            dir.path("prometheus.yml").to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{why}");
}
