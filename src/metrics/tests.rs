#![allow(clippy::unwrap_used)]
use super::*;
use crate::protocol::consts::cmd;

fn line_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn requests_are_counted_by_command_and_result_with_bytes_and_latency() {
    let m = global().export("unit-a", "aes-xts-plain64", "vaes", 4096);
    let r = m.admit(cmd::READ, 4096);
    let w = m.admit(cmd::WRITE, 8192);
    let bad = m.admit(cmd::WRITE, 512);
    let text = global().encode().unwrap();
    assert_eq!(
        line_value(&text, "nbdcrypt_requests_in_flight{export=\"unit-a\"}"),
        Some(3.0)
    );
    r.finish(0);
    w.finish(0);
    bad.finish(err::ENOSPC);
    drop((r, w, bad));
    m.refused(cmd::TRIM, err::EPERM);
    let text = global().encode().unwrap();
    let get = |p: &str| line_value(&text, p);
    assert_eq!(
        get("nbdcrypt_requests_total{export=\"unit-a\",command=\"read\",result=\"ok\"}"),
        Some(1.0)
    );
    assert_eq!(
        get("nbdcrypt_requests_total{export=\"unit-a\",command=\"write\",result=\"ENOSPC\"}"),
        Some(1.0)
    );
    assert_eq!(
        get("nbdcrypt_requests_total{export=\"unit-a\",command=\"trim\",result=\"EPERM\"}"),
        Some(1.0)
    );
    // Only successful transfers count as bytes.
    assert_eq!(
        get("nbdcrypt_read_bytes_total{export=\"unit-a\"}"),
        Some(4096.0)
    );
    assert_eq!(
        get("nbdcrypt_written_bytes_total{export=\"unit-a\"}"),
        Some(8192.0)
    );
    assert_eq!(
        get("nbdcrypt_requests_in_flight{export=\"unit-a\"}"),
        Some(0.0)
    );
    assert_eq!(
        get("nbdcrypt_request_duration_seconds_count{export=\"unit-a\",command=\"write\"}"),
        Some(2.0)
    );
    assert!(text.contains(
        "nbdcrypt_export_info{export=\"unit-a\",backend=\"vaes\",sector_size=\"4096\",cipher=\"aes-xts-plain64\"} 1"
    ));
    assert!(text.contains("nbdcrypt_build_info{version=\""));
    assert!(text.ends_with("# EOF\n"));
}

#[test]
fn process_events_are_counted() {
    let g = global();
    {
        let _c = g.connection_opened(true);
        let text = g.encode().unwrap();
        assert!(line_value(&text, "nbdcrypt_connections_open{tls=\"yes\"}").unwrap() >= 1.0);
    }
    g.handshake_failed("timeout");
    g.kms_call("Decrypt", "denied", Instant::now());
    g.upstream_reconnected("nbd+unix:///unit?socket=/x");
    g.upstream_gave_up("nbd+unix:///unit?socket=/x");
    let text = g.encode().unwrap();
    assert!(
        line_value(
            &text,
            "nbdcrypt_handshake_failures_total{reason=\"timeout\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        line_value(
            &text,
            "nbdcrypt_kms_calls_total{operation=\"Decrypt\",outcome=\"denied\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert!(text.contains("nbdcrypt_kms_call_duration_seconds_bucket{le="));
    assert!(
        text.contains(
            "nbdcrypt_upstream_reconnects_total{upstream=\"nbd+unix:///unit?socket=/x\"} 1"
        )
    );
    assert!(
        text.contains(
            "nbdcrypt_upstream_give_ups_total{upstream=\"nbd+unix:///unit?socket=/x\"} 1"
        )
    );
}

#[test]
fn every_errno_has_a_bounded_name() {
    for e in [
        0,
        err::EPERM,
        err::EIO,
        err::ENOMEM,
        err::EINVAL,
        err::ENOSPC,
        err::EOVERFLOW,
        err::ENOTSUP,
        err::ESHUTDOWN,
    ] {
        assert_ne!(result_name(e), "other", "{e}");
    }
    assert_eq!(result_name(12345), "other");
    assert_eq!(COMMANDS[command_index(999)], "other");
}

#[test]
fn classic_format_names_counters_with_their_suffix() {
    let open = "# HELP x_requests Requests.\n# TYPE x_requests counter\n# UNIT x_requests requests\nx_requests_total{a=\"b\"} 1\n# HELP x_open Open.\n# TYPE x_open gauge\nx_open 2\n# EOF\n";
    assert_eq!(
        to_classic(open),
        "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total{a=\"b\"} 1\n# HELP x_open Open.\n# TYPE x_open gauge\nx_open 2\n"
    );
}
