#!/bin/bash
# rlfleet node bootstrap, rendered by infra_cloud/shared/rlfleet_cloud/bootstrap.py.
# Installs the kit the stack shipped (objects in its bucket, pinned by sha256) in /opt/rlfleet/venv,
# fetches the Ray token from the cloud's secret store (never from this script), starts Ray with
# token auth as systemd units, and on the head puts nginx (TLS) in front of Ray's dashboard / Jobs
# API and of the deploy ports and runs the run supervisor (rlfleet-supervisor). Safe to run again
# on every boot.
set -euo pipefail
umask 077
exec >>/var/log/rlfleet-bootstrap.log 2>&1

@@PARAMS@@

log() { printf '%s rlfleet-bootstrap[%s]: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$ROLE" "$*"; }

imds_aws() {
  local tok
  tok="$(curl -fsS -X PUT http://169.254.169.254/latest/api/token \
    -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')"
  curl -fsS -H "X-aws-ec2-metadata-token: ${tok}" "http://169.254.169.254/latest/meta-data/$1"
}

imds_gcp() {
  curl -fsS -H 'Metadata-Flavor: Google' "http://metadata.google.internal/computeMetadata/v1/instance/$1"
}

node_ip() {
  case "$CLOUD" in
    aws) imds_aws local-ipv4 ;;
    gcp) imds_gcp network-interfaces/0/ip ;;
  esac
}

fetch_token() {
  case "$CLOUD" in
    aws) aws secretsmanager get-secret-value --region "$REGION" --secret-id "$SECRET_REF" \
      --query SecretString --output text ;;
    gcp) gcloud secrets versions access latest --secret="$SECRET_REF" --project="$PROJECT" ;;
  esac
}

publish_ca() {
  case "$CLOUD" in
    aws) aws s3 cp --region "$REGION" --only-show-errors "$1" "$CA_CERT_URI" ;;
    gcp) gcloud storage cp --quiet "$1" "$CA_CERT_URI" ;;
  esac
}

fetch_object() {
  case "$CLOUD" in
    aws) aws s3 cp --region "$REGION" --only-show-errors "$1" "$2" ;;
    gcp) gcloud storage cp --quiet "$1" "$2" ;;
  esac
}

# Fetch one kit file from the stack's bucket with this node's identity; keep it only if its
# sha256 is the one the stack shipped (the value in this script, not anything next to the object).
fetch_verified() {
  local uri="$1" dest="$2" want="$3" part got
  part="$(mktemp "${dest}.part.XXXXXX")"
  if ! fetch_object "$uri" "$part"; then
    rm -f "$part"
    log "cannot fetch ${uri} with this node's identity; the kit is not installed"
    return 1
  fi
  got="$(sha256sum "$part" | cut -d' ' -f1)"
  if [ "$got" != "$want" ]; then
    rm -f "$part"
    log "REFUSED ${uri}: its sha256 ${got} is not the ${want} this stack shipped; the kit is not installed"
    return 1
  fi
  chmod 0644 "$part"
  mv -f "$part" "$dest"
}

# Install the shipped kit into <prefix>/venv: the wheel by path (a direct reference, so pip never
# looks the name rlfleet up on an index), its dependencies pinned by the shipped constraints.
# Nothing to do when that sha256 is already installed. A subshell: the venv must be readable by
# the Ray user whatever this script's umask.
install_kit() (
  umask 022
  local prefix="$1"
  local kit="${prefix}/kit"
  if [ "$(cat "${kit}/installed.sha256" 2>/dev/null)" = "$KIT_SHA256" ] && [ -x "${prefix}/venv/bin/ray" ]; then
    return 0
  fi
  log "installing the kit ${KIT_WHEEL} (sha256 ${KIT_SHA256}) and ray ${RAY_VERSION}"
  install -d -m 0755 "$kit"
  fetch_verified "$KIT_URI" "${kit}/${KIT_WHEEL}" "$KIT_SHA256"
  fetch_verified "$KIT_CONSTRAINTS_URI" "${kit}/constraints.txt" "$KIT_CONSTRAINTS_SHA256"
  [ -x "${prefix}/venv/bin/python" ] || python3 -m venv "${prefix}/venv"
  "${prefix}/venv/bin/pip" install --quiet --disable-pip-version-check -c "${kit}/constraints.txt" \
    "ray[default]==${RAY_VERSION}" "rlfleet[${KIT_EXTRAS}] @ file://${kit}/${KIT_WHEEL}"
  # a new build of the same version replaces the installed kit (its dependencies are in place)
  "${prefix}/venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --force-reinstall \
    "${kit}/${KIT_WHEEL}"
  printf '%s\n' "$KIT_SHA256" >"${kit}/installed.sha256"
)

@@GEN_HEAD_CERT@@

@@SETUP_MONITORING@@

# nginx: the head's TLS front, and haproxy: the balancer a named deployment's controller runs
# (its own process as the rlfleet user, behind nginx), as on-prem's tls_front role installs them.
# The DLAMI / Deep Learning VM images have neither; apt's lists may be missing on a fresh image
# (then one update). The distro's haproxy.service is not used: stopped and disabled.
install_front() {
  local want=()
  command -v nginx >/dev/null 2>&1 || want+=(nginx)
  [ -x /usr/sbin/haproxy ] || want+=(haproxy)
  if [ "${#want[@]}" -gt 0 ]; then
    log "installing ${want[*]} (the TLS front and the serving balancer)"
    local apt=(apt-get -qq -y --no-install-recommends -o Dpkg::Options::=--force-confold)
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${want[@]}" >/dev/null 2>&1 || {
      apt-get -qq update
      DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${want[@]}"
    }
  fi
  systemctl disable --now haproxy.service >/dev/null 2>&1 || true
}

# This node's addresses a client may reach the deploy ports on: its private ip, and the static
# public ip where the node carries it itself (AWS and GCP map it to the private ip instead).
# Never 0.0.0.0: a deploy run binds 127.0.0.1 on the same port number behind the front.
front_addresses() {
  printf '%s\n' "$NODE_IP"
  if [ -n "$HEAD_PUBLIC_IP" ] && [ "$HEAD_PUBLIC_IP" != "$NODE_IP" ] \
    && ip -o -4 addr show | grep -q "inet ${HEAD_PUBLIC_IP}/"; then
    printf '%s\n' "$HEAD_PUBLIC_IP"
  fi
}

# nginx.conf of the head: the Ray dashboard / Jobs API on the API port (Ray checks the bearer
# token; nginx adds TLS) and one server per deploy port (the policy server checks the
# deployment's own token; 502 while no deployment uses the port). TLS 1.2+, the head certificate.
render_nginx_conf() {
  local p addr
  cat <<EOF
user www-data;
worker_processes 1;
pid /run/nginx.pid;
error_log /var/log/nginx/error.log warn;

events {
    worker_connections 512;
}

http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log /var/log/nginx/access.log;
    server_tokens off;
    sendfile on;

    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers off;
    ssl_certificate /etc/rlfleet/tls/server.pem;
    ssl_certificate_key /etc/rlfleet/tls/server.key;
    ssl_session_cache shared:rlfleet:1m;

    server {
        listen 0.0.0.0:${API_PORT} ssl;
        client_max_body_size 512m;
        location / {
            proxy_pass http://127.0.0.1:8265;
            proxy_http_version 1.1;
            proxy_set_header Host \$host;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
            proxy_buffering off;
        }
    }
EOF
  for p in ${SERVE_PORTS//,/ }; do
    echo
    echo "    server {"
    for addr in $(front_addresses); do
      echo "        listen ${addr}:${p} ssl;"
    done
    cat <<EOF
        client_max_body_size 8m;
        location / {
            proxy_pass http://127.0.0.1:${p};
            proxy_http_version 1.1;
            proxy_set_header Host \$host;
            proxy_set_header Connection "";
            proxy_read_timeout 60s;
        }
    }
EOF
  done
  echo "}"
}

# The run supervisor (python -m rlfleet.supervisor, docs/scale-out.md), head only: it turns the
# durable run queue into Ray jobs and restarts runs with max_restarts after infrastructure failures,
# inside the cluster (the submitting machine may be gone). Its queue and heartbeat are
# ${ARTIFACT_ROOT}/queue/ in the stack's bucket, reached with this node's own identity (instance
# role / service account: nothing on its command line but paths and URIs). A unit of its own, not
# part of the Ray unit: it outlives a restart of Ray (then restarts or fails the runs Ray forgot).
# The same program, user and hardening as on-prem's unit (ansible ray_runtime role), minus the NAS:
# it writes nothing on this disk. It polls the bucket every 2 s (2-3 requests a poll).
render_supervisor_unit() {
  cat <<UNIT
[Unit]
Description=rlfleet run supervisor (run queue, restarts)
Wants=rlfleet-ray.service
After=rlfleet-ray.service network-online.target

[Service]
Type=simple
User=rlfleet
Group=rlfleet
WorkingDirectory=/var/lib/rlfleet
Environment=HOME=/var/lib/rlfleet
Environment=PYTHONUNBUFFERED=1
Environment=PYTHONDONTWRITEBYTECODE=1
# the Jobs API on loopback with the token read from its 0600 file (the path, never the token, is here)
ExecStart=/opt/rlfleet/venv/bin/python -m rlfleet.supervisor --address http://127.0.0.1:8265 \
  --token-file /etc/rlfleet/ray_token --root ${ARTIFACT_ROOT} --poll 2
Restart=always
RestartSec=5
TimeoutStopSec=20
UMask=0027
NoNewPrivileges=true
CapabilityBoundingSet=
AmbientCapabilities=
PrivateTmp=true
PrivateDevices=true
ProtectSystem=strict
ProtectHome=true
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectKernelLogs=true
ProtectControlGroups=true
ProtectClock=true
ProtectHostname=true
RestrictSUIDSGID=true
RestrictRealtime=true
RestrictNamespaces=true
LockPersonality=true
SystemCallArchitectures=native
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX

[Install]
WantedBy=multi-user.target
UNIT
}

log "start (stack ${STACK})"
if ! id rlfleet >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/rlfleet --create-home --shell /usr/sbin/nologin rlfleet
fi
install -d -m 0750 -o root -g rlfleet /etc/rlfleet
install -d -m 0755 /opt/rlfleet

install_kit /opt/rlfleet

# The token goes straight from the secret store into a 0600 file owned by the Ray user.
token_tmp="$(mktemp /etc/rlfleet/.ray_token.XXXXXX)"
fetch_token >"$token_tmp"
chown rlfleet:rlfleet "$token_tmp"
chmod 0600 "$token_tmp"
mv -f "$token_tmp" /etc/rlfleet/ray_token

NODE_IP="$(node_ip)"
setup_monitoring "$NODE_IP" || log "monitoring agent setup failed; continuing without it"

cat >/etc/rlfleet/ray.env <<ENV
RAY_AUTH_MODE=token
RAY_AUTH_TOKEN_PATH=/etc/rlfleet/ray_token
RLFLEET_TARGET=${STACK}
RAY_RUNTIME_ENV_PLUGINS='[{"class": "rlfleet_agents.requirements_env.RequirementsPlugin"}]'
RLFLEET_REQUIREMENTS_CACHE=/var/lib/rlfleet/requirements
RAY_USAGE_STATS_ENABLED=0
ENV
chmod 0640 /etc/rlfleet/ray.env
chgrp rlfleet /etc/rlfleet/ray.env

if [ "$ROLE" = head ]; then
  if [ ! -s /etc/rlfleet/tls/server.pem ]; then
    log "generating the head's TLS certificate"
    gen_head_cert /etc/rlfleet/tls "$HEAD_PUBLIC_IP" "$NODE_IP"
  fi
  publish_ca /etc/rlfleet/tls/ca.pem
  install_front
  render_nginx_conf >/etc/nginx/nginx.conf.rlfleet
  mv -f /etc/nginx/nginx.conf.rlfleet /etc/nginx/nginx.conf
  chmod 0644 /etc/nginx/nginx.conf
  nginx -t -q
  # a deploy run is placed on the head by this resource (one per deploy port) and learns the
  # front from the unit's environment, as on-prem's tls_front role sets it
  serve_slots="$(tr ',' '\n' <<<"$SERVE_PORTS" | grep -c .)"
  ray_args="--head --port=6379 --dashboard-host=127.0.0.1 --dashboard-port=8265 --num-gpus=0 --temp-dir=/var/lib/rlfleet/ray"
  ray_args="${ray_args} '--resources={\"${SERVE_FRONT_RESOURCE}\": ${serve_slots}}'"
  serve_front_env="Environment=RLFLEET_SERVE_TLS_ADDRESS=${HEAD_PUBLIC_IP}
Environment=RLFLEET_SERVE_TLS_PORTS=${SERVE_PORTS}"
else
  ray_args="--address=${HEAD_PRIVATE_IP}:6379 --num-gpus=${GPU_COUNT}"
  serve_front_env=""
fi

cat >/etc/systemd/system/rlfleet-ray.service <<UNIT
[Unit]
Description=rlfleet Ray ${ROLE}
After=network-online.target
Wants=network-online.target

[Service]
User=rlfleet
EnvironmentFile=/etc/rlfleet/ray.env
# Ray runs the SDK's job entrypoint ("python -m rlfleet_agents.run") with this PATH: the kit's venv
Environment=PATH=/opt/rlfleet/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
${serve_front_env}
ExecStart=/opt/rlfleet/venv/bin/ray start --block ${ray_args} --node-ip-address=${NODE_IP} --metrics-export-port=8080
ExecStop=/opt/rlfleet/venv/bin/ray stop
Restart=on-failure
RestartSec=10

[Install]
WantedBy=multi-user.target
UNIT

systemctl daemon-reload
systemctl enable --now rlfleet-ray.service
if [ "$ROLE" = head ]; then
  systemctl enable nginx.service
  systemctl restart nginx.service
  render_supervisor_unit >/etc/systemd/system/rlfleet-supervisor.service
  chmod 0644 /etc/systemd/system/rlfleet-supervisor.service
  systemctl daemon-reload
  systemctl enable rlfleet-supervisor.service
  # restarted on every run of this script: a new kit or unit takes effect (its state is in the bucket)
  systemctl restart rlfleet-supervisor.service
fi

if [ "$MAX_LIFETIME_MIN" -gt 0 ]; then
  log "stopping this instance in ${MAX_LIFETIME_MIN} min (max_lifetime_hours)"
  shutdown -h "+${MAX_LIFETIME_MIN}" "rlfleet: max lifetime reached"
fi
log "done"
