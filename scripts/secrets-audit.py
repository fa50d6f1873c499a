#!/usr/bin/env python3
"""Searches every log a test run kept for every key the run used.

`scripts/test.sh` runs the suite with NBDCRYPT_TEST_ARTIFACTS=DIR; each test directory leaves
behind its logs (server logs, audit logs), its key files (64 raw bytes or 128 hex digits) and
its local KMS stores (keys.json: key material as hex). This script takes every key, whole and
per 32-byte half, in raw bytes, hex (both cases) and base64, and searches every log for each.
A hit prints the log and the form (never the key) and fails the run; so does a run that kept
too little to mean anything.

Usage: scripts/secrets-audit.py DIR [--min-logs N] [--min-keys N] [--extra-log FILE ...]
"""
import argparse
import base64
import json
import pathlib
import sys

try:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
except ImportError:  # the test venv has it; scripts/test.sh runs this with the venv's python
    sys.exit("secrets-audit: needs the `cryptography` package (the test venv has it)")

found_wrapped = [0]


def secrets(root: pathlib.Path):
    found = {}
    for p in root.glob("*/keys/*"):
        b = p.read_bytes()
        if len(b) == 64:
            # Raw keys are random bytes; a 64-byte text file is not a key.
            if not all(32 < c < 127 or c in b"\t\n\r " for c in b):
                found[b] = str(p)
        else:
            try:
                k = bytes.fromhex(b[:128].decode())
            except ValueError:
                continue
            if len(k) == 64:
                found[k] = str(p)
    for p in root.glob("*/kms/*"):
        try:
            store = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        stack = [store]
        while stack:
            v = stack.pop()
            if isinstance(v, dict):
                if isinstance(v.get("hex"), str) and "version" in v:
                    found[bytes.fromhex(v["hex"])] = f"{p} (KMS material)"
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(v)
    # Data keys of volumes wrapped by the local KMS: each header copy holds a blob
    # NBK1 | key id (16) | material version (4) | nonce (12) | sealed 64-byte key | tag (16),
    # AES-256-GCM under that key's material. GCM encrypts with AES-CTR from counter block
    # nonce || 2, so the key is recovered without the encryption context (no tag check needed).
    materials = {}
    for p in root.glob("*/kms/*"):
        try:
            store = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        for kid, rec in (store.get("keys") or {}).items():
            for m in rec.get("materials") or []:
                materials[(kid.replace("-", ""), m["version"])] = bytes.fromhex(m["hex"])
    wrapped = 0
    for p in root.glob("*/headers/*"):
        head = p.read_bytes()
        at = head.find(b"NBK1")
        while at >= 0 and at + 36 + 64 <= len(head):
            kid = head[at + 4 : at + 20].hex()
            version = int.from_bytes(head[at + 20 : at + 24], "big")
            nonce = head[at + 24 : at + 36]
            sealed = head[at + 36 : at + 36 + 64]
            material = materials.get((kid, version))
            if material is not None:
                ctr = Cipher(algorithms.AES(material), modes.CTR(nonce + b"\0\0\0\x02"))
                key = ctr.decryptor().update(sealed)
                found[key] = f"{p} (data key wrapped by the local KMS)"
                wrapped += 1
            at = head.find(b"NBK1", at + 4)
    found_wrapped[0] = wrapped
    return found


def forms(key: bytes):
    parts = [("whole", key)]
    if len(key) == 64:
        parts += [("first half", key[:32]), ("second half", key[32:])]
    for part, b in parts:
        yield f"{part} raw", b
        yield f"{part} hex", b.hex().encode()
        yield f"{part} HEX", b.hex().upper().encode()
        yield f"{part} base64", base64.b64encode(b).rstrip(b"=")[:-1]
        yield f"{part} base64url", base64.urlsafe_b64encode(b).rstrip(b"=")[:-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=pathlib.Path)
    ap.add_argument("--min-logs", type=int, default=50)
    ap.add_argument("--min-keys", type=int, default=50)
    ap.add_argument("--extra-log", action="append", default=[], type=pathlib.Path)
    a = ap.parse_args()
    keys = secrets(a.dir)
    logs = sorted(a.dir.glob("*/logs/*")) + [p for p in a.extra_log if p.exists()]
    data = [(p, p.read_bytes()) for p in logs]
    size = sum(len(d) for _, d in data)
    print(
        f"secrets-audit: {len(keys)} keys ({found_wrapped[0]} volume data keys unwrapped from "
        f"local-KMS headers), {len(data)} logs ({size / 1e6:.1f} MB)"
    )
    if len(keys) < a.min_keys or len(data) < a.min_logs:
        print(
            f"secrets-audit: too little kept to mean anything (need ≥{a.min_keys} keys and "
            f"≥{a.min_logs} logs): is NBDCRYPT_TEST_ARTIFACTS reaching the tests?",
            file=sys.stderr,
        )
        return 1
    hits = 0
    for key, origin in keys.items():
        for form, needle in forms(key):
            for p, d in data:
                if needle in d:
                    hits += 1
                    print(f"secrets-audit: LEAK: {form} of the key from {origin} in {p}", file=sys.stderr)
    if hits:
        return 1
    print("secrets-audit: no key material in any log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
