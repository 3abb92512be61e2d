#!/usr/bin/env bash
# A private CA and certificates for the TLS compose overlay (docker-compose.tls.yml), in deploy/tls/:
#   ca.pem                         the CA every party trusts (its key, ca.key, stays here: keep it offline)
#   server.pem/.key                RabbitMQ and Redis (names rabbitmq, redis, localhost, 127.0.0.1, and
#                                  FEDQ_CERT_SANS, e.g. DNS:fedq.example.org,IP:192.0.2.7, for workers
#                                  on other machines: they check the name they connect to)
#   <party>.pem/.key               client certificates: admin (the enroll service), coordinator, site-a, monitor
# Keys are readable by the containers' users only where this runs as root (it hands them to uid
# 10001, fedq's, and 999, RabbitMQ's and Redis's); otherwise they are made group-readable and it says so.
# For production use your organisation's PKI; this is for a single Docker host.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p tls && cd tls
days=${FEDQ_CERT_DAYS:-365}
if [ ! -e ca.pem ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
        -days "$days" -subj "/CN=fedq CA" 2>/dev/null
fi
issue() {  # name, extensions
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.csr" \
        -subj "/CN=$1" 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$1.pem" -days "$days" \
        -extfile <(printf '%s\n' "$2") 2>/dev/null
    rm -f "$1.csr"
}
issue server "subjectAltName=DNS:rabbitmq,DNS:redis,DNS:localhost,IP:127.0.0.1${FEDQ_CERT_SANS:+,$FEDQ_CERT_SANS}
extendedKeyUsage=serverAuth"
for party in admin coordinator site-a monitor; do
    issue "$party" "extendedKeyUsage=clientAuth"
done
chmod 0600 ca.key
if [ "$(id -u)" = 0 ]; then
    chown 999:999 server.key && chmod 0400 server.key
    for party in admin coordinator site-a monitor; do chown 10001:10001 "$party.key"; chmod 0400 "$party.key"; done
else
    chmod 0644 server.key admin.key coordinator.key site-a.key monitor.key
    echo "note: not root, so the keys are world-readable for the containers; run as root to restrict them" >&2
fi
echo "wrote deploy/tls: ca.pem, server.pem, admin/coordinator/site-a/monitor client certificates"
