#!/usr/bin/env bash
# Make the TLS and authentication material of an ST-RPNet deployment (docs/deployment.md).
#
#   deploy/make_certs.sh OUT_DIR [--host NAME_OR_IP]... [--site NAME]... [--days N] [--keys-only] [--force]
#
# Writes (private keys mode 600):
#   OUT_DIR/ca.crt, ca.key            the federation's CA (keep ca.key offline; give ca.crt to every site)
#   OUT_DIR/server.pem, server.key    the SuperLink's certificate: SAN = localhost, 127.0.0.1 and every --host
#   OUT_DIR/sites/NAME/NAME.key       a site's EC P-384 private key in OpenSSH format (stays at the site)
#   OUT_DIR/sites/NAME/NAME.pub       its public key (the coordinator registers it: flower-server --site-key)
# In a real deployment each site runs `deploy/make_certs.sh DIR --site NAME --keys-only` itself and sends only
# NAME.pub to the coordinator.
# Nothing is overwritten without --force: a site key already registered at the coordinator, or a server
# certificate in use, is kept (--force replaces them); an existing CA is never replaced, and a ca.crt without its
# ca.key beside it (kept offline) stops the script instead of minting a new CA.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
die() { echo "make_certs.sh: $*" >&2; exit 1; }
[[ $# -ge 1 && $1 != -* ]] || usage
OUT=$1; shift
HOSTS=(); SITES=(); DAYS=365; KEYS_ONLY=0; FORCE=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --host|--site|--days) [[ $# -ge 2 ]] || die "$1 needs a value" ;;&
    --host) [[ $2 =~ ^[A-Za-z0-9.:-]+$ ]] || die "--host $2: a DNS name or an IP address"; HOSTS+=("$2"); shift 2 ;;
    --site) [[ $2 =~ ^[A-Za-z0-9._-]+$ ]] || die "--site $2: letters, digits, '.', '_' and '-' only"; SITES+=("$2"); shift 2 ;;
    --days) [[ $2 =~ ^[1-9][0-9]*$ ]] || die "--days $2: a positive number of days"; DAYS=$2; shift 2 ;;
    --keys-only) KEYS_ONLY=1; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "make_certs.sh: unknown argument $1" >&2; usage ;;
  esac
done
# Everything is checked before anything is written.
if [[ $KEYS_ONLY -eq 0 ]]; then
  command -v openssl >/dev/null || die "openssl is required"
  if [[ -f $OUT/ca.crt && ! -f $OUT/ca.key ]]; then
    die "$OUT/ca.crt exists but ca.key is not beside it (kept offline?): put it back to issue the server certificate, or use --keys-only"
  fi
  if [[ -f $OUT/server.pem && $FORCE -eq 0 ]]; then
    die "$OUT/server.pem exists: --force issues a new one (same CA)"
  fi
fi
for s in "${SITES[@]+"${SITES[@]}"}"; do
  if [[ -f $OUT/sites/$s/$s.key && $FORCE -eq 0 ]]; then
    die "$OUT/sites/$s/$s.key exists (its public key may be registered at the coordinator): --force replaces it"
  fi
done
mkdir -p "$OUT"
umask 077
errors=$(mktemp); trap 'rm -f "$errors"' EXIT
quiet() { "$@" 2>"$errors" || { cat "$errors" >&2; die "failed: $1 ${2:-}"; }; }  # openssl's progress is noise

if [[ $KEYS_ONLY -eq 0 ]]; then
  san="DNS:localhost,IP:127.0.0.1"
  for h in "${HOSTS[@]+"${HOSTS[@]}"}"; do
    if [[ $h =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || $h == *:* ]]; then san+=",IP:$h"; else san+=",DNS:$h"; fi
  done
  if [[ ! -f $OUT/ca.key ]]; then
    quiet openssl req -x509 -newkey rsa:4096 -sha256 -nodes -days "$DAYS" \
      -keyout "$OUT/ca.key" -out "$OUT/ca.crt" -subj "/CN=ST-RPNet federation CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
  fi
  quiet openssl req -newkey rsa:4096 -sha256 -nodes -keyout "$OUT/server.key.new" -out "$OUT/server.csr" \
    -subj "/CN=ST-RPNet SuperLink"
  ext=$(mktemp); trap 'rm -f "$ext" "$errors"' EXIT
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$ext"
  quiet openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
    -out "$OUT/server.pem.new" -days "$DAYS" -sha256 -extfile "$ext"
  mv "$OUT/server.key.new" "$OUT/server.key"; mv "$OUT/server.pem.new" "$OUT/server.pem"  # a pair, or the old one
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
    venv_python="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"  # has cryptography (with flwr)
    [[ -x $venv_python ]] || venv_python=python3
    "${PYTHON:-$venv_python}" - "$d/$s.key" "$d/$s.pub" "$s" <<'PY'
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
