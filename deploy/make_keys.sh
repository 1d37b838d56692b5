#!/usr/bin/env bash
# Make one SuperNode authentication key pair per name (ECDSA P-384, OpenSSH format).
#
#   deploy/make_keys.sh OUT_DIR NAME [NAME ...]
#
# OUT_DIR/NAME is the private key (stays on that device: --auth-supernode-private-key),
# OUT_DIR/NAME.pub the public key (registered with `flwr supernode register`).
# An existing key pair is kept.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 OUT_DIR NAME [NAME ...]" >&2
  exit 2
fi
out="$1"; shift
mkdir -p "$out"
for name in "$@"; do
  if [[ ! -f "$out/$name" ]]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$out/$name"
  fi
  echo "$out/$name (private), $out/$name.pub (public)"
done
