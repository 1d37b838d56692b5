#!/usr/bin/env bash
# Make a CA and a SuperLink server certificate signed by it (openssl), for TLS on every connection.
#
#   deploy/make_certs.sh OUT_DIR [NAME_OR_IP ...]
#
# OUT_DIR receives ca.crt (give it to every SuperNode and to `flwr`), ca.key (keep it
# secret), server.crt and server.key (for flower-superlink). The server certificate is
# valid for every host name and IP address given (default: localhost 127.0.0.1 ::1).
# An existing CA in OUT_DIR is reused, so adding a name re-signs only the server certificate.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUT_DIR [NAME_OR_IP ...]" >&2
  exit 2
fi
out="$1"; shift
names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(localhost 127.0.0.1 ::1)

san=""
for name in "${names[@]}"; do
  if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then san+="IP:${name},"; else san+="DNS:${name},"; fi
done
san="${san%,}"

mkdir -p "$out"
cd "$out"
if [[ ! -f ca.key || ! -f ca.crt ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -days 3650 -nodes \
    -keyout ca.key -out ca.crt -subj "/CN=FedRA Flower CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -nodes -keyout server.key -out server.csr \
  -subj "/CN=${names[0]}" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt \
  -days 825 -sha256 -extfile server.ext 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key
echo "CA: $out/ca.crt  server certificate for ${names[*]}: $out/server.crt (key $out/server.key)"
