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

# Debian packages:
# - libssl-dev + pkg-config: the `openssl` crate the benchmarks use as a reference;
# - util-linux: setpriv/prlimit (refused-mlock test), losetup (ext4 test);
# - the NBD peers: qemu-utils (qemu-io), libnbd-bin (nbdinfo, nbdcopy, nbdfuse), fio;
# - fuse3 and e2fsprogs: nbdfuse's mount helper, mkfs.ext4 and e2fsck;
# - nbdkit and gnuplot-nox: the peers and the chart of the benchmark smoke run (bench.sh --quick);
# - the kernel-path VM (scripts/vm-e2e.sh): qemu-system-x86, cpio, kmod (depmod), xxd, and
#   cryptsetup-bin (copied into the guest);
# - openssl: the test PKI of the TLS tests (scripts/tls-certs.sh);
# - bsdutils (`script`: a terminal for the progress-bar test) and systemd (`systemd-analyze`
#   verifies contrib/nbdcrypt.service).
# qemu-system-x86 goes first, alone: Debian's 7.2 replaces a newer qemu-utils if one is
# installed, and qemu-utils is then (re)installed in the matching version with the rest, so that
# every test runs against one qemu.
VM_PACKAGES=(qemu-system-x86)
DEB_PACKAGES=(libssl-dev pkg-config util-linux qemu-utils libnbd-bin fio fuse3 e2fsprogs nbdkit
    gnuplot-nox cpio kmod xxd cryptsetup-bin bsdutils systemd openssl)
# A Debian python3 needs python3-venv for `python3 -m venv`; a pyenv one has it built in.
python3 -c 'import venv, ensurepip' 2>/dev/null || DEB_PACKAGES+=(python3-venv)
# shellcheck source=scripts/lib/deb.sh
. "$ROOT/scripts/lib/deb.sh"
deb_install_missing "${VM_PACKAGES[@]}"
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

export NBDCRYPT_PYTHON="$VENV/bin/python"
export NBDCRYPT_REQUIRE_PEERS=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings

# Every test directory leaves its logs and keys here for the secret audit below.
export NBDCRYPT_TEST_ARTIFACTS="$ROOT/target/test-artifacts"
rm -rf "$NBDCRYPT_TEST_ARTIFACTS"
mkdir -p "$NBDCRYPT_TEST_ARTIFACTS"

log "cargo test (debug profile)"
cargo test --locked --all-targets

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
