#!/usr/bin/env bash
# The test command (README, `make test`, .ci/run): lint, then every Molecule scenario.
#   test.sh [lint|unit|molecule|SCENARIO[@DEBIAN]...]   default: lint, unit and every scenario
# Exits non-zero on the first failure. A dockerd that bootstrap started for this run is
# stopped again on exit, so a CI run ends cleanly.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
# shellcheck source=bootstrap.sh
source molecule/shared/bootstrap.sh
stop_dockerd() {
  if [ -n "${DOCKERD_STARTED_PID:-}" ]; then
    echo "[test] stopping the dockerd this run started (pid $DOCKERD_STARTED_PID)"
    kill "$DOCKERD_STARTED_PID" 2>/dev/null || true
    wait "$DOCKERD_STARTED_PID" 2>/dev/null || true
  fi
}
trap stop_dockerd EXIT

# Every scenario, and the Debian releases it runs on. Debian 12 runs the all-in-one deployment
# over SSH (ssh: the default scenario's converge as user deploy with sudo, pipelining off, and
# its tests that depend on the release) in place of default@12, which `test.sh default@12`
# still runs in full: the budget is 60 min.
all_scenarios=(ssh@12 default@13 cluster@13 django@13)

lint() {
  echo "[test] yamllint"; yamllint --strict .
  echo "[test] ansible-lint (production profile)"; ansible-lint
  echo "[test] Markdown links and anchors"; python3 molecule/shared/check_links.py .
  # Every shipped inventory parses completely (a stray file in an inventory directory is an
  # inventory source to Ansible) and site.yml lists its hosts against it.
  for inventory in inventories/*/; do
    echo "[test] inventory $inventory"
    ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED=true ansible-playbook site.yml -i "$inventory" --list-hosts >/dev/null
  done
}
# The stack's derived decisions (the celery_stack.core filters) and the settings module every
# host imports (with real Celery), as plain Python; the alert rules through promtool's tests.
unit() {
  echo "[test] unit tests: the collection celery_stack.core, the settings module of the hosts, the alert rules (promtool)"
  python -m pytest -q -p no:cacheprovider collections/ansible_collections/celery_stack/core/tests/unit \
    roles/celery_app/tests roles/celery_worker/tests roles/celery_monitoring/tests
}
# A failed scenario ends with the tests that failed: CI keeps only the end of the output, where
# Molecule's own summary says just "Verifier tests failed".
run_scenario() {
  local scenario=${1%@*} debian=${1#*@} started log
  [ "$debian" = "$1" ] && debian=12
  started=$(date +%s) log=$(mktemp)
  echo "[test] molecule test -s $scenario on Debian $debian"
  if ! MOLECULE_DEBIAN=$debian molecule test -s "$scenario" 2>&1 | tee "$log"; then
    echo "[test] scenario $scenario on Debian $debian FAILED after $(( $(date +%s) - started )) s; pytest's summary:"
    # Molecule wraps long lines: a summary line may be "FAILED" alone, its test on the next line.
    sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -A1 -E '(FAILED|ERROR)( [a-z_./]+\.py|\s*$)|^[^a-z]*fatal:' \
      | grep -v -E 'RETRYING|^--$' | tail -n 40 || true
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
  echo "[test] scenario $scenario on Debian $debian passed in $(( $(date +%s) - started )) s"
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(lint unit "${all_scenarios[@]}")
started=$(date +%s) passed=0
for target in "${targets[@]}"; do
  case "$target" in
    lint) lint ;;
    unit) unit ;;
    molecule) for s in "${all_scenarios[@]}"; do run_scenario "$s"; passed=$((passed + 1)); done ;;
    *) run_scenario "$target"; passed=$((passed + 1)) ;;
  esac
done
echo "[test] all done in $(( $(date +%s) - started )) s"
echo "scenarios: $passed passed, 0 failed"
