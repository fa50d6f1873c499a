#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with a Rust toolchain.
#
# Installs every peer the tests drive (Debian packages, a Python venv), then runs formatting,
# lints and every test in the debug profile. Peers are required: a missing one fails the run
# (NBDCRYPT_REQUIRE_PEERS=1). Benchmarks are separate (scripts/bench.sh, scripts/bench-xts.sh);
# only a short smoke run of scripts/bench.sh --quick runs here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '\n==> %s\n' "$*"; }
# Disk is what a CI runner runs out of first: say what there is, and what the run used.
disk_report() {
    log "disk: $(df -h --output=avail "$ROOT" | tail -1 | tr -d ' ') free where target/ lives; target/ holds $(du -sh "$ROOT/target" 2>/dev/null | cut -f1 || echo nothing)"
}

# --quick: the contributor's loop (a few minutes, no installs, no root): formatting, lints, the
# unit tests and the integration tests that need no peer. Peers that are missing are skipped
# knowingly (NBDCRYPT_SKIP_MISSING_PEERS=1) and listed at the end.
if [[ "${1:-}" == "--quick" ]]; then
    export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}" NBDCRYPT_SKIP_MISSING_PEERS=1
    SKIPPED="$ROOT/target/tmp/skipped-peers.txt"
    rm -f "$SKIPPED"
    log "cargo fmt --check"
    cargo fmt --all -- --check
    log "cargo clippy --all-targets -- -D warnings"
    cargo clippy --locked --all-targets -- -D warnings
    log "unit tests and the integration tests that need no peer"
    cargo test --locked --lib
    cargo test --locked --test xts_kat --test xts_properties --test xts_concurrency \
        --test split_identity --test memory_bound --test concurrent_writes --test hostile \
        --test disconnects --test crash --test panics --test mistakes --test mistakes_serving --test flood
    if [[ -s "$SKIPPED" ]]; then
        log "skipped for missing peers (scripts/test.sh runs them all):"
        cat "$SKIPPED"
    fi
    exit 0
fi

# Debian packages:
# - libssl-dev + pkg-config: the `openssl` crate the benchmarks use as a reference;
# - util-linux: setpriv/prlimit (refused-mlock test), losetup (ext4 test);
# - the NBD peers: qemu-utils (qemu-io), libnbd-bin (nbdinfo, nbdcopy, nbdfuse) and
#   python3-libnbd (the conformance tests drive libnbd call by call), fio;
# - fuse3 and e2fsprogs: nbdfuse's mount helper, mkfs.ext4 and e2fsck;
# - nbdkit and gnuplot-nox: the peers and the chart of the benchmark smoke run (bench.sh --quick);
# - the kernel-path VM (scripts/vm-e2e.sh): qemu-system-x86, cpio, kmod (depmod), xxd, and
#   cryptsetup-bin (copied into the guest);
# - openssl: the test PKI of the TLS tests (scripts/tls-certs.sh);
# - bsdutils (`script`: a terminal for the progress-bar test) and systemd (`systemd-analyze`
#   verifies contrib/nbdcrypt.service);
# - ceph-mon, ceph-mgr, ceph-osd, ceph-common: the throw-away cluster of tests/ceph.rs
#   (scripts/ceph-single-node.sh; qemu-nbd exports its RBD images through qemu-block-extra);
# - prometheus (with promtool): the scraper of tests/metrics.rs, started by the test on loopback.
# qemu (qemu-system-x86 for the VM, qemu-utils for qemu-io/qemu-img, qemu-block-extra) is made
# one consistent version by scripts/lib/qemu.sh, whatever the machine starts with (see there).
DEB_PACKAGES=(libssl-dev pkg-config util-linux libnbd-bin python3-libnbd fio fuse3 e2fsprogs nbdkit
    gnuplot-nox cpio kmod xxd cryptsetup-bin bsdutils systemd openssl
    ceph-mon ceph-mgr ceph-osd ceph-common prometheus)
# A Debian python3 needs python3-venv for `python3 -m venv`; a pyenv one has it built in.
python3 -c 'import venv, ensurepip' 2>/dev/null || DEB_PACKAGES+=(python3-venv)
# shellcheck source=scripts/lib/deb.sh
. "$ROOT/scripts/lib/deb.sh"
# shellcheck source=scripts/lib/qemu.sh
. "$ROOT/scripts/lib/qemu.sh"
deb_install_missing "${DEB_PACKAGES[@]}"

# Python venv: pyca/cryptography (OpenSSL XTS, an oracle independent of our code) and moto
# (an AWS KMS emulator for the aws-sdk-kms path, started by the tests on loopback).
VENV="${NBDCRYPT_VENV:-$ROOT/.venv}"
if ! "$VENV/bin/python" -c 'import cryptography, moto' 2>/dev/null || [ ! -x "$VENV/bin/moto_server" ]; then
    log "building the Python venv in $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -r "$ROOT/scripts/requirements-test.txt"
fi

# Tests write only inside their own temporary directories: the tree must look the same after
# the run as before it (untracked or changed files that git does not ignore).
tree_state() { git -C "$ROOT" status --porcelain=v1 --untracked-files=all 2>/dev/null || true; }
TREE_BEFORE="$(tree_state)"

export NBDCRYPT_PYTHON="$VENV/bin/python"
# A missing peer fails a test by default; this also overrides a NBDCRYPT_SKIP_MISSING_PEERS=1
# left in the environment: the full run never skips.
export NBDCRYPT_REQUIRE_PEERS=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# A machine that carries a newer qemu-io than its sources offer (qemu 10 from backports): the
# qemu interop tests run against it first, then qemu is made consistent for the rest.
QEMU_WANT="$(apt-cache policy qemu-system-x86 2>/dev/null | awk '/Candidate:/ { print $2 }')"
QEMU_HAVE="$(qemu_version_of qemu-utils)"
if [[ -n "$QEMU_HAVE" && -n "$QEMU_WANT" && "$QEMU_HAVE" != "$QEMU_WANT" ]] && command -v qemu-io >/dev/null; then
    log "qemu interop tests against this machine's $(qemu-io --version | head -1)"
    cargo test --locked --test tls_interop --test interop -- qemu
fi
qemu_consistent
log "peer versions: $(qemu-io --version | head -1); $(qemu-system-x86_64 --version | head -1); $(nbdinfo --version | head -1); $(fio --version); $(nbdkit --version)"

disk_report
log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings

# Every test directory leaves its logs and keys here for the secret audit below.
export NBDCRYPT_TEST_ARTIFACTS="$ROOT/target/test-artifacts"
rm -rf "$NBDCRYPT_TEST_ARTIFACTS"
mkdir -p "$NBDCRYPT_TEST_ARTIFACTS"

# A hung test must fail the run, not eat CI's time limit: `timeout` signals its whole process
# group, so the test binaries and whatever they started (servers, nbdfuse) go with it.
log "cargo test (debug profile; at most ${NBDCRYPT_TEST_MINUTES:-45} minutes)"
timeout -k 60 "${NBDCRYPT_TEST_MINUTES:-45}m" cargo test --locked --all-targets

log "doc tests"
cargo test --locked --doc

log "kernel NBD client in a VM (scripts/vm-e2e.sh)"
scripts/vm-e2e.sh

log "secret audit: every log of the run searched for every key (scripts/secrets-audit.py)"
"$NBDCRYPT_PYTHON" scripts/secrets-audit.py "$NBDCRYPT_TEST_ARTIFACTS"

log "fuzz smoke run: every cargo-fuzz target builds and runs 20 s without a crash (scripts/fuzz.sh)"
scripts/fuzz.sh 20

log "benchmark smoke run (scripts/bench.sh --quick: debug build, every peer server, every job)"
scripts/bench.sh --quick --out "$ROOT/target/bench-quick"
log "benchmark smoke runs of the proxy and Ceph cases (bench.sh --quick --proxy, --quick --ceph)"
scripts/bench.sh --quick --proxy --out "$ROOT/target/bench-quick-proxy"
scripts/bench.sh --quick --ceph --out "$ROOT/target/bench-quick-ceph"
log "benchmark smoke run of volume reencrypt against dd (scripts/bench-reencrypt.sh --quick)"
scripts/bench-reencrypt.sh --quick --out "$ROOT/target/bench-quick-reencrypt"

disk_report

log "the working tree is as clean as before the run"
TREE_AFTER="$(tree_state)"
if [[ "$TREE_AFTER" != "$TREE_BEFORE" ]]; then
    echo "test.sh: the run left files in the working tree (tests must write only in their temporary directories):" >&2
    diff <(printf '%s\n' "$TREE_BEFORE") <(printf '%s\n' "$TREE_AFTER") >&2 || true
    exit 1
fi
