"""The health check of the worker instances (celery-worker-health.timer), checked by behaviour.

- every worker host runs the timer, and its last run found every instance of the host answering;
- a worker instance that stops consuming (its main process stopped with SIGSTOP: it still runs
  for systemd, holds its broker connection and its reserved tasks, and answers nothing) is
  restarted by the check within the configured detection window, and every other instance, on
  this host and the others, keeps running untouched;
- what a check costs, next to what `celery inspect ping` costs for one instance (printed).

The stop test drives two hosts, so it runs once rather than once per host.
"""

import json
import os
import re
import time

import testinfra
import testinfra.utils.ansible_runner

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
WORKERS = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("celery_workers")
HEALTH = "celery-worker-health"

testinfra_hosts = [f"ansible://{name}" for name in WORKERS]


def _host(name):
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=INVENTORY)


def _instances(host):
    return [entry["instance"] for entry in json.loads(host.check_output("cat /etc/celery-stack/workers.json"))]


def _main_pids(host):
    return {name: host.check_output(f"systemctl show -p MainPID --value celery-worker@{name}.service")
            for name in _instances(host)}


def _settings(host):
    """interval, failures and timeout as the units on the host have them."""
    timer = host.check_output(f"systemctl cat {HEALTH}.timer")
    service = host.check_output(f"systemctl show -p ExecStart --value {HEALTH}.service")
    option = lambda name: float(re.search(rf"--{name} (\S+)", service).group(1))  # noqa: E731
    return int(re.search(r"OnUnitInactiveSec=(\d+)", timer).group(1)), int(option("failures")), option("timeout")


def _health_log(host, since="-1h"):
    return host.check_output(f"journalctl -u {HEALTH}.service --since {since} --no-pager -o cat")


def test_the_timer_checks_every_instance_of_the_host(host):
    assert host.service(f"{HEALTH}.timer").is_enabled
    assert host.service(f"{HEALTH}.timer").is_running
    interval, _, _ = _settings(host)
    deadline = time.time() + 3 * interval + 30
    expected = ", ".join(f"{name} ok" for name in sorted(_instances(host)))
    while f"checked: {expected}" not in _health_log(host, f"-{2 * interval}s"):
        assert time.time() < deadline, _health_log(host)
        time.sleep(2)


def test_a_stopped_worker_is_restarted_and_no_other_instance_is_touched():
    hosts = {name: _host(name) for name in WORKERS}
    stuck_host = hosts[WORKERS[-1]]
    before = {name: _main_pids(host) for name, host in hosts.items()}
    stuck = "io-threads"
    interval, failures, timeout = _settings(stuck_host)
    # failures missed checks, each at most one interval plus the answer timeout apart; one more
    # interval for the first check to come, and a minute for the warm shutdown and the start
    window = (failures + 1) * (interval + timeout) + 60
    stopped_at = time.time()
    stuck_host.check_output(f"kill -STOP {before[WORKERS[-1]][stuck]}")
    while True:
        pid = stuck_host.check_output(f"systemctl show -p MainPID --value celery-worker@{stuck}.service")
        if pid not in ("0", before[WORKERS[-1]][stuck]):
            break
        assert time.time() - stopped_at < window, _health_log(stuck_host, "-10min")
        time.sleep(1)
    print(f"\n{stuck} stopped with SIGSTOP: restarted by the health check after {time.time() - stopped_at:.0f} s "
          f"(interval {interval} s, {failures} missed pings, window {window:.0f} s)")
    assert f"restarted celery-worker@{stuck}.service: no answer to {failures} pings in a row" in _health_log(
        stuck_host, "-10min")
    # the new process consumes: it answers a ping by its node name
    node = f"{stuck}@{stuck_host.check_output('hostname')}"
    deadline = time.time() + 120
    while not stuck_host.run(f"/opt/celery-stack/bin/celery-stack inspect ping --timeout 2 -d {node}").succeeded:
        assert time.time() < deadline, f"{node} does not answer after its restart"
        time.sleep(2)
    after = {name: _main_pids(host) for name, host in hosts.items()}
    before[WORKERS[-1]].pop(stuck)
    after[WORKERS[-1]].pop(stuck)
    assert after == before  # every other instance: the same process as before


def test_what_a_check_costs(host):
    """CPU per run (user + system of the process and its children), measured on the host."""
    measure = r"""
import resource, subprocess, sys, time
def cost(argv, n=5):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(n):
        subprocess.run(argv, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)) / n
check = sys.argv[1].split()
ping = ["/opt/celery-stack/bin/celery-stack", "inspect", "ping", "--timeout", "5", "-d", sys.argv[2]]
print(cost(check), cost(ping))
"""
    command = host.check_output(f"systemctl show -p ExecStart --value {HEALTH}.service")
    argv = re.search(r"argv\[\]=(.*?) ;", command).group(1).replace("%t", "/run")
    argv = argv.replace("/run/celery-stack-health/misses.json", "/root/health-cost.json")
    node = f"{_instances(host)[0]}@{host.check_output('hostname')}"
    host.check_output(f"cat > /root/health-cost.py <<'EOF'\n{measure}\nEOF")
    check_cpu, ping_cpu = map(float, host.check_output(
        f"set -a; . /etc/celery-stack/celery.env; set +a; "
        f"/opt/celery-stack/venv/bin/python /root/health-cost.py '{argv}' {node}").split())
    count = len(_instances(host))
    print(f"\n{host.check_output('hostname')}: one health check of its {count} instances {check_cpu:.2f} s CPU; "
          f"`celery inspect ping` per instance {ping_cpu:.2f} s CPU, x {count} = {ping_cpu * count:.2f} s "
          f"({ping_cpu * count / check_cpu:.1f} x the check)")
