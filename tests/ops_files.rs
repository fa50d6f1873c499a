//! The operations files work as shipped: every fio job file in `benches/fio/` runs against a
//! served volume through `scripts/fio-bench.sh` (nbd engine) and its summary has a row per job
//! and direction; `contrib/nbdcrypt.service` passes `systemd-analyze verify`.
//! Peers: fio, nbdinfo; systemd-analyze.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

#[test]
fn fio_bench_runs_every_job_file_against_the_server() {
    let prereq = have("fio").and_then(|()| have("nbdinfo"));
    if !peer_available("fio + nbdinfo", prereq) {
        return;
    }
    let dir = TempDir::new("fio-jobs");
    let server = Server::start(&dir, &[keyed_export(&dir, "b", ",size=64M")]);
    let json = dir.path("summary.json");
    let out = run_ok(
        Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fio-bench.sh"))
            .args(["--runtime", "1", "--json"])
            .arg(&json)
            .arg(server.uri("b")),
    );
    for job in [
        "seq-write-1m-qd16",
        "seq-read-1m-qd16",
        "randread-4k-qd32",
        "randwrite-4k-qd32",
        "mixed-70-30-4k-qd32",
        "latency-randread-4k-qd1",
        "latency-randwrite-4k-qd1",
    ] {
        assert!(out.contains(job), "{job} missing:\n{out}");
    }
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(rows.len(), 8, "7 jobs, the mix has two directions");
    assert!(
        rows.iter().all(|r| r["IOPS"].as_f64().unwrap_or(0.0) > 0.0),
        "{rows:?}"
    );
    // A mounted or non-block target is refused before any write.
    let refused = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fio-bench.sh"))
        .arg("/dev/null")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a block device"));
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    if !peer_available("systemd-analyze", have("systemd-analyze")) {
        return;
    }
    let dir = TempDir::new("unit");
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/nbdcrypt.service"
    ))
    .unwrap();
    // Point ExecStart at the binary under test (the unit expects /usr/local/bin/nbdcrypt).
    let unit = unit.replace("/usr/local/bin/nbdcrypt", env!("CARGO_BIN_EXE_nbdcrypt"));
    assert!(unit.contains("NoNewPrivileges=yes") && unit.contains("LimitMEMLOCK="));
    let path = dir.path("nbdcrypt.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Only our unit's own lines matter (the host's other units may have their own complaints).
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("nbdcrypt.service"))
        .collect();
    assert!(ours.is_empty(), "{err}");
}

/// `scripts/lib/deb.sh` waits for another apt/dpkg instead of failing at once: with a fake
/// `apt-get` that reports the dpkg lock as held twice, the install still succeeds, asked apt
/// to wait for the lock, and retried; a real failure is not retried.
#[test]
fn deb_install_waits_for_the_dpkg_lock() {
    let dir = TempDir::new("deb-lock");
    let bin = dir.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = dir.path("calls");
    let fake_apt = format!(
        "#!/bin/bash\necho \"$*\" >> {calls}\nn=$(wc -l < {calls})\n\
         if [ \"$1\" != update ] && grep -q fail-for-real <<<\"$*\"; then echo 'E: Unable to locate package fail-for-real'; exit 100; fi\n\
         if [ \"$n\" -le 2 ]; then echo 'E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 (apt-get)'; exit 100; fi\nexit 0\n",
        calls = calls.display()
    );
    let fake_query = "#!/bin/bash\nexit 1\n";
    for (name, text) in [("apt-get", fake_apt.as_str()), ("dpkg-query", fake_query)] {
        let p = bin.join(name);
        std::fs::write(&p, text).unwrap();
        run_ok(Command::new("chmod").arg("755").arg(&p));
    }
    let script = |pkg: &str| {
        Command::new("bash")
            .arg("-c")
            .arg(format!(
                ". {}/scripts/lib/deb.sh; deb_install_missing {pkg}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            )
            .env("DEB_LOCK_RETRY_SECONDS", "0.05")
            .output()
            .unwrap()
    };
    let out = script("somepkg");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(&calls).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    // update refused twice (lock), then update and install.
    assert_eq!(lines.len(), 4, "{log}");
    assert!(
        lines.iter().all(|l| l.contains("DPkg::Lock::Timeout=")),
        "{log}"
    );
    assert!(
        lines[3].contains("install") && lines[3].contains("somepkg"),
        "{log}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("apt is busy"));
    // A package that does not exist fails at once, with apt's message.
    std::fs::write(&calls, "x\nx\nx\n").unwrap();
    let out = script("fail-for-real");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unable to locate package"));
}

/// `scripts/lib/qemu.sh` on a machine like a fresh one here: qemu-utils and qemu-block-extra
/// 10.x from backports, no qemu-system-x86, sources offering 7.2. It installs the whole set at
/// the sources' version (downgrading) in one apt call, and removes a qemu package that exists
/// only in the newer version, instead of letting apt break or drop qemu-utils.
#[test]
fn qemu_set_is_made_consistent_whatever_the_machine_has() {
    let dir = TempDir::new("qemu-set");
    let bin = dir.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = dir.path("calls");
    // 10.x installed (one package only exists there); the sources offer 7.2, whose
    // arch-dependent packages carry a binary-rebuild suffix (+b3) that qemu-system-data lacks.
    let fakes = [
        (
            "dpkg-query",
            "#!/bin/bash\n\
             printf '%s\\n' 'qemu-utils install ok installed qemu 1:10.0.2+ds-2~bpo12+1' \
             'qemu-block-extra install ok installed qemu 1:10.0.2+ds-2~bpo12+1' \
             'qemu-system-data install ok installed qemu 1:10.0.2+ds-2~bpo12+1' \
             'qemu-block-supplemental install ok installed qemu 1:10.0.2+ds-2~bpo12+1' \
             'fio install ok installed fio 3.33-1'\n",
        ),
        (
            "apt-cache",
            "#!/bin/bash\n\
             case \"$1 $2\" in\n\
             'policy qemu-block-supplemental') echo '  Candidate: (none)' ;;\n\
             'policy qemu-system-data') echo '  Candidate: 1:7.2+dfsg-7' ;;\n\
             policy*) echo '  Candidate: 1:7.2+dfsg-7+b3' ;;\n\
             'show qemu-system-data='*) echo 'Package: qemu-system-data'; echo 'Source: qemu' ;;\n\
             show*) echo 'Source: qemu (1:7.2+dfsg-7)' ;;\n\
             esac\n",
        ),
        ("apt-get", "#!/bin/bash\necho \"$*\" >> CALLS\n"),
    ];
    for (name, text) in fakes {
        let p = bin.join(name);
        std::fs::write(&p, text.replace("CALLS", &calls.display().to_string())).unwrap();
        run_ok(Command::new("chmod").arg("755").arg(&p));
    }
    let qemu_consistent = || {
        Command::new("bash")
            .arg("-c")
            .arg(format!(
                ". {root}/scripts/lib/deb.sh; . {root}/scripts/lib/qemu.sh; qemu_consistent",
                root = env!("CARGO_MANIFEST_DIR")
            ))
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            )
            .output()
            .unwrap()
    };
    let out = qemu_consistent();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(&calls).unwrap();
    let install = log
        .lines()
        .find(|l| l.contains(" install "))
        .unwrap_or_else(|| panic!("no install: {log}"));
    for want in [
        "--allow-downgrades",
        "qemu-system-x86=1:7.2+dfsg-7+b3",
        "qemu-utils=1:7.2+dfsg-7+b3",
        "qemu-block-extra=1:7.2+dfsg-7+b3",
        "qemu-system-data=1:7.2+dfsg-7",
    ] {
        assert!(
            install.split_whitespace().any(|w| w == want),
            "{want}: {log}"
        );
    }
    assert!(!install.contains("fio"), "{log}");
    let remove = log
        .lines()
        .find(|l| l.contains(" remove "))
        .unwrap_or_else(|| panic!("no remove: {log}"));
    assert!(remove.contains("qemu-block-supplemental"), "{log}");
    // Already consistent: nothing to do.
    std::fs::remove_file(&calls).unwrap();
    let consistent = "#!/bin/bash\nfor p in qemu-system-x86 qemu-utils qemu-block-extra qemu-system-data; do \
                      echo \"$p install ok installed qemu 1:7.2+dfsg-7\"; done\n";
    std::fs::write(bin.join("dpkg-query"), consistent).unwrap();
    assert!(qemu_consistent().status.success());
    assert!(!calls.exists(), "apt-get ran for a consistent set");
}

/// Runs scripts/bench_report.py over the raw results in `dir`: one round of 1 s jobs, 2 cores.
fn bench_report(dir: &TempDir, extra: &[&str]) {
    run_ok(
        Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/bench_report.py"
            ))
            .arg(&dir.0)
            .args(["--ticks", "100", "--rounds", "1", "--cores", "2"])
            .args(["--elapsed", "1", "--size-mib", "64", "--runtime", "1"])
            .args(extra),
    );
}

/// scripts/bench.sh gives every fio job a time limit and records a job that fails or hangs as
/// `JOB.failed`; the report then shows that cell as FAILED instead of losing the whole run.
#[test]
fn bench_report_shows_a_failed_job_as_a_failed_cell() {
    let dir = TempDir::new("bench-report");
    let round = dir.path("raw/round-1/nbdcrypt-tls");
    std::fs::create_dir_all(&round).unwrap();
    std::fs::write(round.join("mc4.failed"), "timeout after 64s").unwrap();
    bench_report(&dir, &[]);
    let table = std::fs::read_to_string(dir.path("table.md")).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.contains("4 conns") && l.contains("FAILED (1/1 rounds)")),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path("results.json")).unwrap()).unwrap();
    assert_eq!(json["failed"][0]["metric"], "mc4", "{json}");
    let script =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench.sh")).unwrap();
    assert!(script.contains("timeout -k 10 \"$JOB_LIMIT\" fio"));
}

/// The report's machine table: from bench.sh's `/proc/stat` deltas ("busy steal total cpus")
/// and fio's bandwidth, how busy the machine was, its CPU-seconds per GB, what a server added
/// to the reference's, and the ninth of the reference's that 0.9× of it allows.
#[test]
fn bench_report_computes_the_machine_budget() {
    let dir = TempDir::new("bench-machine");
    // (server, write bytes/s, busy, steal and total ticks); two CPUs
    for (server, bw, busy, steal, total) in [
        ("nbdkit-proxy", 1_000_000_000u64, 90u64, 10u64, 200u64),
        ("nbdcrypt-proxy", 500_000_000, 150, 0, 200),
    ] {
        let round = dir.path(&format!("raw/round-1/{server}"));
        std::fs::create_dir_all(&round).unwrap();
        let fio = format!(
            r#"note: fio may print this first
{{"jobs": [{{"read": {{"bw_bytes": 0, "iops": 0}}, "write": {{"bw_bytes": {bw}, "iops": {}}}}}]}}"#,
            bw / 1_048_576
        );
        std::fs::write(round.join("seqwrite.json"), fio).unwrap();
        std::fs::write(round.join("seqwrite.cpu"), "100").unwrap();
        std::fs::write(
            round.join("seqwrite.machine"),
            format!("{busy} {steal} {total} 2"),
        )
        .unwrap();
    }
    bench_report(&dir, &["--mode", "proxy"]);
    let table = std::fs::read_to_string(dir.path("table.md")).unwrap();
    // nbdkit-proxy: busy (90 + 10) / 200 = 50 %; 90 / 200 × 2 = 0.9 CPU-s per s at 1 GB/s.
    // nbdcrypt-proxy: 75 %; 1.5 CPU-s per s at 0.5 GB/s = 3.0 per GB, 2.1 more; 0.9 / 9 = 0.1.
    for row in [
        "| nbdkit-proxy: 1 MiB write | 50 % | 0.90 | – | 0.10 |",
        "| nbdcrypt-proxy: 1 MiB write | 75 % | 3.00 | +2.10 | 0.10 |",
    ] {
        assert!(table.lines().any(|l| l == row), "no `{row}` in\n{table}");
    }
    assert!(
        table.contains("| 1 MiB write: GB per machine CPU-s (GB/CPU-s) | 0.33 (0.33–0.33) ×0.30"),
        "{table}"
    );
}
