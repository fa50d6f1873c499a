#!/usr/bin/env python3
"""Independent XTS-AES-256 oracle for nbdcrypt's differential tests.

Uses pyca/cryptography (OpenSSL's EVP_aes_256_xts underneath), never nbdcrypt code.
Reads lines `OP KEY_HEX SECTOR_BYTES FIRST_IV_SECTOR IV_STEP DATA_HEX` on stdin, where OP is
`enc` or `dec`, FIRST_IV_SECTOR is the plain64 IV (decimal) of the first sector and IV_STEP
the IV increment per sector; writes the result as one hex line per input line.
"""
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def main() -> int:
    out = sys.stdout
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        op, key_hex, sector_bytes, first_iv, iv_step, data_hex = line.split()
        key = bytes.fromhex(key_hex)
        size = int(sector_bytes)
        iv = int(first_iv)
        step = int(iv_step)
        data = bytes.fromhex(data_hex)
        result = bytearray()
        for off in range(0, len(data), size):
            tweak = iv.to_bytes(16, "little")
            cipher = Cipher(algorithms.AES(key), modes.XTS(tweak))
            ctx = cipher.encryptor() if op == "enc" else cipher.decryptor()
            result += ctx.update(data[off:off + size]) + ctx.finalize()
            iv += step
        out.write(result.hex() + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
