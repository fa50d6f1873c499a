#!/usr/bin/env python3
"""Probes an NBD server call by call and prints what it answered, as JSON, so that two servers
(nbdcrypt and nbdkit) can be compared answer by answer (tests/conformance.rs).

Two clients:
  raw    our own socket client: fixed newstyle, optionally STRUCTURED_REPLY, then GO; it sends
         exactly the requests asked for (also ones libnbd would refuse client-side) and reports
         the error value or chunk it got back, and whether the connection survived.
  libnbd python3-libnbd (Debian's), with strict mode relaxed where a case needs a request
         libnbd would otherwise refuse itself.

Usage: nbd_probe.py raw HOST PORT EXPORT
       nbd_probe.py libnbd URI
"""
import json
import socket
import struct
import sys

OPTS_MAGIC = 0x49484156454F5054
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668E33EF
OPT_GO, OPT_STRUCTURED_REPLY = 7, 8
CMD_READ, CMD_WRITE, CMD_TRIM, CMD_CACHE = 0, 1, 4, 5


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


def option(s, code, data=b""):
    s.sendall(struct.pack(">QII", OPTS_MAGIC, code, len(data)) + data)
    replies = []
    while True:
        magic, opt, typ, length = struct.unpack(">QIII", recv_exact(s, 20))
        payload = recv_exact(s, length)
        replies.append((typ, payload))
        if typ == 1 or typ & 0x80000000:  # ACK or an error ends the option
            return replies


def connect(host, port, export, structured):
    s = socket.create_connection((host, int(port)))
    s.settimeout(10)
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    if structured:
        option(s, OPT_STRUCTURED_REPLY)
    name = export.encode()
    replies = option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    info = {}
    for typ, payload in replies:
        if typ == 3 and len(payload) >= 2:  # INFO
            kind = struct.unpack(">H", payload[:2])[0]
            if kind == 0:
                info["size"], info["flags"] = struct.unpack(">QH", payload[2:12])
            elif kind == 3:
                info["block"] = list(struct.unpack(">III", payload[2:14]))
    return s, info


def request(s, structured, cmd, offset, length, payload=b"", flags=0):
    """One request; returns (errno, data bytes) or ('closed', None)."""
    try:
        s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, 42, offset, length) + payload)
        data = b""
        while True:
            magic = struct.unpack(">I", recv_exact(s, 4))[0]
            if magic == SIMPLE_MAGIC:
                err, _cookie = struct.unpack(">IQ", recv_exact(s, 12))
                if err == 0 and cmd == CMD_READ:
                    data = recv_exact(s, length)
                return err, data
            if magic != STRUCT_MAGIC:
                return "bad-magic", None
            cflags, ctype, _cookie, clen = struct.unpack(">HHQI", recv_exact(s, 16))
            body = recv_exact(s, clen)
            if ctype == 1:  # OFFSET_DATA
                if clen < 9:
                    return "data-chunk-too-short", None
                data += body[8:]
            elif ctype & 0x8000:  # an error chunk
                return struct.unpack(">I", body[:4])[0], None
            if cflags & 1:  # DONE
                return 0, data
    except (EOFError, ConnectionError, socket.timeout, OSError):
        return "closed", None


def alive(s, structured):
    err, data = request(s, structured, CMD_READ, 0, 512)
    return err == 0 and data is not None and len(data) == 512


def raw(host, port, export):
    out = {}
    for structured in (False, True):
        mode = "structured" if structured else "simple"
        s, info = connect(host, port, export, structured)
        out[f"{mode}.info"] = info
        for name, cmd, off, length in (
            ("read0", CMD_READ, 0, 0),
            ("cache0", CMD_CACHE, 0, 0),
            ("cache", CMD_CACHE, 0, 65536),
            ("read-past-end", CMD_READ, info["size"] - 100, 512),
        ):
            err = request(s, structured, cmd, off, length)[0]
            out[f"{mode}.{name}"] = {"errno": err, "alive": alive(s, structured)}
        s.close()
    return out


def raw_readonly(host, port, export):
    s, _ = connect(host, port, export, True)
    out = {}
    for name, cmd, length, payload in (
        ("trim", CMD_TRIM, 4096, b""),
        ("write", CMD_WRITE, 512, b"\x07" * 512),
    ):
        err = request(s, True, cmd, 0, length, payload)[0]
        out[f"readonly.{name}"] = {"errno": err, "alive": alive(s, True)}
    return out


def libnbd(uri):
    import nbd  # python3-libnbd

    out = {}
    h = nbd.NBD()
    h.connect_uri(uri)
    out["block"] = [
        h.get_block_size(nbd.SIZE_MINIMUM),
        h.get_block_size(nbd.SIZE_PREFERRED),
        h.get_block_size(nbd.SIZE_MAXIMUM),
    ]
    out["can_cache"] = bool(h.can_cache())
    # A zero-length read, which libnbd refuses itself unless told not to.
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ZERO_SIZE)
    try:
        h.pread(0, 0)
        out["read0"] = "ok"
    except nbd.Error as e:
        out["read0"] = e.errno
    # The connection must survive it (libnbd kills it on a protocol violation).
    try:
        out["alive_after_read0"] = len(h.pread(512, 0)) == 512
    except nbd.Error as e:
        out["alive_after_read0"] = f"error: {e}"
    # A 50 MB write and read (the reference server's integrity test sends about that much).
    size = 50_000_000
    if h.get_size() >= size:
        pattern = bytes(range(251)) * (size // 251 + 1)
        data = pattern[:size]
        try:
            h.pwrite(data, 0)
            h.flush()
            out["big"] = h.pread(size, 0) == data
        except nbd.Error as e:
            out["big"] = f"error: {e}"
    if out["can_cache"]:
        try:
            h.cache(1 << 20, 0)
            out["cache"] = "ok"
        except nbd.Error as e:
            out["cache"] = e.errno
    h.shutdown()
    return out


def libnbd_readonly(uri):
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_COMMANDS)
    out = {}
    try:
        h.trim(4096, 0)
        out["trim"] = "ok"
    except nbd.Error as e:
        out["trim"] = e.errno
    h.shutdown()
    return out


def main():
    mode = sys.argv[1]
    if mode == "raw":
        result = raw(*sys.argv[2:5])
    elif mode == "raw-readonly":
        result = raw_readonly(*sys.argv[2:5])
    elif mode == "libnbd":
        result = libnbd(sys.argv[2])
    elif mode == "libnbd-readonly":
        result = libnbd_readonly(sys.argv[2])
    else:
        sys.exit(__doc__)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
