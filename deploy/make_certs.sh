#!/usr/bin/env bash
# Make the TLS and authentication material of an ST-RPNet deployment (docs/deployment.md).
#
#   deploy/make_certs.sh OUT_DIR [--host NAME_OR_IP]... [--site NAME]... [--days N]
#
# Writes (private keys mode 600):
#   OUT_DIR/ca.crt, ca.key            the federation's CA (keep ca.key offline; give ca.crt to every site)
#   OUT_DIR/server.pem, server.key    the SuperLink's certificate: SAN = localhost, 127.0.0.1 and every --host
#   OUT_DIR/sites/NAME/NAME.key       a site's EC P-384 private key in OpenSSH format (stays at the site)
#   OUT_DIR/sites/NAME/NAME.pub       its public key (the coordinator registers it: flower-server --site-key)
# In a real deployment each site runs `deploy/make_certs.sh DIR --site NAME --keys-only` itself and sends only
# NAME.pub to the coordinator.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
[[ $# -ge 1 ]] || usage
OUT=$1; shift
HOSTS=(); SITES=(); DAYS=365; KEYS_ONLY=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --host) HOSTS+=("$2"); shift 2 ;;
    --site) SITES+=("$2"); shift 2 ;;
    --days) DAYS=$2; shift 2 ;;
    --keys-only) KEYS_ONLY=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "make_certs.sh: unknown argument $1" >&2; usage ;;
  esac
done
command -v openssl >/dev/null || { echo "make_certs.sh: openssl is required" >&2; exit 1; }
mkdir -p "$OUT"
umask 077

if [[ $KEYS_ONLY -eq 0 ]]; then
  san="DNS:localhost,IP:127.0.0.1"
  for h in "${HOSTS[@]+"${HOSTS[@]}"}"; do
    if [[ $h =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || $h == *:* ]]; then san+=",IP:$h"; else san+=",DNS:$h"; fi
  done
  if [[ ! -f $OUT/ca.key ]]; then
    openssl req -x509 -newkey rsa:4096 -sha256 -nodes -days "$DAYS" \
      -keyout "$OUT/ca.key" -out "$OUT/ca.crt" -subj "/CN=ST-RPNet federation CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  fi
  openssl req -newkey rsa:4096 -sha256 -nodes -keyout "$OUT/server.key" -out "$OUT/server.csr" \
    -subj "/CN=ST-RPNet SuperLink" 2>/dev/null
  ext=$(mktemp); trap 'rm -f "$ext"' EXIT
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$ext"
  openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
    -out "$OUT/server.pem" -days "$DAYS" -sha256 -extfile "$ext" 2>/dev/null
  rm -f "$OUT/server.csr"
  chmod 644 "$OUT/ca.crt" "$OUT/server.pem"
  echo "CA: $OUT/ca.crt; SuperLink certificate: $OUT/server.pem (SAN $san)"
fi

for s in "${SITES[@]+"${SITES[@]}"}"; do
  d="$OUT/sites/$s"; mkdir -p "$d"
  rm -f "$d/$s.key" "$d/$s.key.pub" "$d/$s.pub"
  if command -v ssh-keygen >/dev/null; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "strpnet-site-$s" -f "$d/$s.key"
    mv "$d/$s.key.pub" "$d/$s.pub"
  else  # the cryptography package comes with flwr
    "${PYTHON:-python3}" - "$d/$s.key" "$d/$s.pub" "$s" <<'PY'
import sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
k = ec.generate_private_key(ec.SECP384R1())
open(sys.argv[1], "wb").write(k.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
pub = k.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
open(sys.argv[2], "wb").write(pub + f" strpnet-site-{sys.argv[3]}\n".encode())
PY
  fi
  chmod 600 "$d/$s.key"; chmod 644 "$d/$s.pub"
  echo "site $s: private key $d/$s.key (keep at the site), public key $d/$s.pub (send to the coordinator)"
done
