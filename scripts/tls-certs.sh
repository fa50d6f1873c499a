#!/usr/bin/env bash
# A throwaway X.509 PKI for trying and testing nbdcrypt's TLS (not for production: use your own
# CA). Writes, into DIR (created 0700):
#   ca-cert.pem ca-key.pem                  the CA
#   server-cert.pem server-key.pem          server certificate for localhost, 127.0.0.1, ::1 and
#                                           10.0.2.2 (the host as seen from a qemu user-net guest)
#   client-cert.pem client-key.pem          a client certificate signed by the CA
#   client/                                 libnbd/qemu layout: ca-cert.pem client-cert.pem
#                                           client-key.pem (for tls-certificates= / tls-creds-x509)
#   nocert/                                 the CA only: a client that trusts the server but has
#                                           no certificate of its own
#   other/                                  a client certificate from a different CA (and the
#                                           real CA to verify the server): must be refused
# Keys are ECDSA P-256, mode 600; certificates are valid for 30 days.
#
# Usage: scripts/tls-certs.sh DIR
set -euo pipefail
[[ $# -eq 1 ]] || { sed -n '2,17p' "$0" >&2; exit 2; }
command -v openssl >/dev/null || { echo "tls-certs.sh: openssl is not installed" >&2; exit 1; }
D="$1"
mkdir -p "$D"
chmod 700 "$D"
cd "$D"
umask 077

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ca() { # name keyfile certfile
    key "$2"
    openssl req -x509 -new -key "$2" -out "$3" -days 30 -subj "/CN=$1" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
}
leaf() { # cn cakey cacert keyfile certfile extensions
    key "$4"
    openssl req -new -key "$4" -subj "/CN=$1" -out "$5.csr"
    printf '%s\n' "$6" >"$5.ext"
    openssl x509 -req -in "$5.csr" -CA "$3" -CAkey "$2" -CAcreateserial -days 30 \
        -extfile "$5.ext" -out "$5" 2>/dev/null
    rm -f "$5.csr" "$5.ext"
}
ca "nbdcrypt test CA" ca-key.pem ca-cert.pem
leaf localhost ca-key.pem ca-cert.pem server-key.pem server-cert.pem \
    "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1,IP:10.0.2.2"
leaf "nbdcrypt test client" ca-key.pem ca-cert.pem client-key.pem client-cert.pem \
    "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
mkdir -p client nocert other
cp ca-cert.pem client-cert.pem client-key.pem client/
cp ca-cert.pem nocert/
ca "another CA" other/other-ca-key.pem other/other-ca-cert.pem
leaf "client of another CA" other/other-ca-key.pem other/other-ca-cert.pem \
    other/client-key.pem other/client-cert.pem \
    "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
cp ca-cert.pem other/ca-cert.pem
rm -f ./*.srl other/*.srl
# Public parts may be read by anyone (e.g. a dropped-privilege server or an unprivileged client).
chmod 644 ./*-cert.pem client/*-cert.pem nocert/*-cert.pem other/*-cert.pem
chmod 755 client nocert other
