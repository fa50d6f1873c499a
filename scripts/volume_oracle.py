#!/usr/bin/env python3
"""Independent decryption of an nbdcrypt backing file, for the interop tests.

Usage: volume_oracle.py FILE KEY_HEX SECTOR_BYTES DATA_OFFSET START LENGTH
Decrypts sectors of the data area (aes-xts-plain64, IV = byte offset in the data area / 512,
as docs/on-disk-format.md specifies) with pyca/cryptography, never nbdcrypt code, and writes the
plaintext bytes START..START+LENGTH (volume coordinates) to stdout. A sector whose ciphertext is
all zero bytes is a hole and reads as zeroes (docs/on-disk-format.md).
"""
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def main() -> int:
    path, key_hex, sector, data_offset, start, length = sys.argv[1:7]
    key = bytes.fromhex(key_hex)
    sector, data_offset, start, length = int(sector), int(data_offset), int(start), int(length)
    first = start // sector
    last = (start + length + sector - 1) // sector
    out = bytearray()
    with open(path, "rb") as f:
        for s in range(first, last):
            f.seek(data_offset + s * sector)
            ct = f.read(sector)
            ct += bytes(sector - len(ct))
            if ct == bytes(sector):
                out += ct
                continue
            tweak = (s * sector // 512).to_bytes(16, "little")
            d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
            out += d.update(ct) + d.finalize()
    skip = start - first * sector
    sys.stdout.buffer.write(bytes(out[skip:skip + length]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
