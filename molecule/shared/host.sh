#!/usr/bin/env bash
# Start or remove one systemd container host, with the flags that boot systemd on these
# machines (no --privileged: it fails here) and the host CA bundle for pip (test hosts only).
#   host.sh up NAME DEBIAN_VERSION NETWORK SUBNET IP [GROUP...]   (GROUPs are only labels)
#   host.sh down NAME...
set -euo pipefail
cmd=$1; shift
case "$cmd" in
  up)
    name=$1 version=$2 network=$3 subnet=$4 ip=$5
    docker network inspect "$network" >/dev/null 2>&1 \
      || docker network create --subnet "$subnet" "$network" >/dev/null
    # A container of that name that is not ours on this network (a Molecule scenario's, or
    # anybody's) is never taken over.
    if docker container inspect "$name" >/dev/null 2>&1; then
      owner=$(docker container inspect -f '{{ index .Config.Labels "celery-stack" }}' "$name")
      nets=$(docker container inspect -f '{{ range $k, $v := .NetworkSettings.Networks }}{{ $k }} {{ end }}' "$name")
      if [ "$owner" != host ] || [[ " $nets " != *" $network "* ]]; then
        echo "host $name: a container of that name exists and is not this stack's (network: $nets)" >&2
        exit 1
      fi
    else
      docker run -d --name "$name" --hostname "$name" --network "$network" --ip "$ip" \
        --cap-add SYS_ADMIN --cgroupns=host \
        --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
        -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock \
        -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/host-ca.crt:ro \
        -e PIP_CERT=/etc/ssl/host-ca.crt \
        --label celery-stack=host "celery-stack-debian:$version" >/dev/null
    fi
    docker start "$name" >/dev/null
    # systemd is up when is-system-running answers running (or degraded: a unit failed,
    # which the roles' own checks will report better than this script can).
    for _ in $(seq 60); do
      state=$(docker exec "$name" systemctl is-system-running 2>/dev/null || true)
      case "$state" in running|degraded) exit 0 ;; esac
      sleep 0.5
    done
    echo "host $name: systemd did not come up (state: ${state:-none})" >&2; exit 1 ;;
  down)
    docker rm -f "$@" >/dev/null 2>&1 || true ;;
  *) echo "usage: $0 up|down ..." >&2; exit 2 ;;
esac
