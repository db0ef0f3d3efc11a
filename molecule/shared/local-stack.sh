#!/usr/bin/env bash
# The README's local stack: systemd containers for every host of inventories/local, then the
# real site.yml against them. Left running; `make down` removes it.
#   local-stack.sh up|down|status
# CELERY_STACK_INVENTORY=inventories/local-redis-broker: the same for another inventory of
# container hosts (the fault suite's Redis-broker comparison).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
inventory=${CELERY_STACK_INVENTORY:-inventories/local}
# name ip debian network subnet, one line per host, from the inventory itself.
hosts() {
  ansible-inventory -i "$inventory" --list | python3 -c '
import json, sys
meta = json.load(sys.stdin)["_meta"]["hostvars"]
for name, v in sorted(meta.items()):
    c = v["local_container"]
    print(name, c["ip"], c["debian"], v["local_container_network"], v["local_container_subnet"])'
}
case "${1:-}" in
  up)
    # shellcheck source=bootstrap.sh
    source molecule/shared/bootstrap.sh
    hosts | while read -r name ip debian network subnet; do
      molecule/shared/host.sh up "$name" "$debian" "$network" "$subnet" "$ip"
    done
    ansible-playbook -i "$inventory" molecule/shared/prepare.yml
    ansible-playbook -i "$inventory" site.yml
    echo
    echo "Up (containers on docker network $(hosts | awk 'NR==1 {print $4}')):"
    hosts | awk '{printf "  %-26s %s\n", $1, $2}'
    if [ "$inventory" = inventories/local ]; then cat <<TXT
  RabbitMQ management UI: http://172.30.87.11:15672/  (user ops-admin, see inventories/local)
  A shell on a host:      docker exec -it celery-stack-worker-1 bash
  Workers:                docker exec celery-stack-worker-1 systemctl list-units 'celery-worker@*'
  Alerts:                 Prometheus and Alertmanager on celery-stack-monitor-1 (127.0.0.1:9090 and :9093
                          inside it, docs/alerts.md); what reached the receiver:
                          docker exec celery-stack-monitor-1 cat /var/tmp/alerts.jsonl
  Run site.yml again:     .venv/bin/ansible-playbook -i inventories/local site.yml
  Benchmark the pools:    make bench
  Fault suite:            make faults
  Load suite:             make load
  Tear it down:           make down
TXT
    fi ;;
  down)
    source molecule/shared/bootstrap.sh
    mapfile -t names < <(hosts | awk '{print $1}')
    mapfile -t networks < <(hosts | awk '{print $4}' | sort -u)
    molecule/shared/host.sh down "${names[@]}"
    docker network rm "${networks[@]}" >/dev/null 2>&1 || true
    echo "The local stack is removed." ;;
  status)
    docker ps --filter label=celery-stack=host --format '{{.Names}}\t{{.Status}}' ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
