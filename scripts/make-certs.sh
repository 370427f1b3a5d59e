#!/usr/bin/env bash
# Test certificates for migration over TLS: a CA, a server certificate for `stage2 receive`
# (valid for 127.0.0.1, localhost and every address given; it also serves as the client
# certificate of `migrate --local`, whose spawned receiver uses it) and a client certificate for
# `stage2 migrate`, all signed by the CA. For tests and trials, not production: the keys are
# written unencrypted.
#
#   scripts/make-certs.sh DIR [ADDRESS...]
#     DIR/ca.pem                       --tls-ca on both sides
#     DIR/server.pem DIR/server.key    receive --tls-cert/--tls-key
#     DIR/client.pem DIR/client.key    migrate --tls-cert/--tls-key (mutual TLS)
set -euo pipefail
dir=${1:?usage: make-certs.sh DIR [ADDRESS...]}
shift
mkdir -p "$dir"
cd "$dir"
san="IP:127.0.0.1,DNS:localhost"
for a in "$@"; do
  if [[ $a =~ ^[0-9.]+$ || $a == *:* ]]; then san="$san,IP:$a"; else san="$san,DNS:$a"; fi
done
curve=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${curve[@]}" -keyout ca.key -out ca.pem -days 30 -subj "/CN=stage2 test CA" 2>/dev/null
for who in server client; do
  openssl req "${curve[@]}" -keyout "$who.key" -out "$who.csr" -subj "/CN=stage2 $who" 2>/dev/null
  ext="$who.ext"
  if [ "$who" = server ]; then
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" > "$ext"
  else
    printf 'extendedKeyUsage=clientAuth\n' > "$ext"
  fi
  openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -extfile "$ext" -out "$who.pem" 2>/dev/null
  rm -f "$who.csr" "$ext"
done
rm -f ca.srl
