# shellcheck shell=bash
# gen_head_cert DIR SAN_IP...
# Creates a private CA and a server certificate for the head's TLS endpoint in DIR:
#   ca.pem (public; the SDK pins it), server.pem + server.key (mode 0600).
# The CA key is deleted right after signing, so nobody can mint another certificate for it.
gen_head_cert() {
  local dir="$1"
  shift
  local san="" ip
  for ip in "$@"; do
    san="${san:+${san},}IP:${ip}"
  done
  install -d -m 0700 "$dir"
  local work
  work="$(mktemp -d)"
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -days 3650 -subj "/CN=rlfleet head CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$work/ca.key" -out "$dir/ca.pem" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=rlfleet-head" -keyout "$dir/server.key" -out "$work/server.csr" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
    "$san" >"$work/ext.cnf"
  openssl x509 -req -in "$work/server.csr" -CA "$dir/ca.pem" -CAkey "$work/ca.key" \
    -CAserial "$work/ca.srl" -CAcreateserial -days 825 -sha256 -extfile "$work/ext.cnf" -out "$dir/server.pem" 2>/dev/null
  chmod 0600 "$dir/server.key"
  chmod 0644 "$dir/ca.pem" "$dir/server.pem"
  rm -rf "$work"
}
