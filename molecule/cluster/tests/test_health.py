"""The health of the worker instances, checked by behaviour: systemd's watchdog (WatchdogSec=,
fed from each worker's event loop) and the health check (celery-worker-health.timer).

- every worker host runs the timer, and its last run found every instance of the host answering;
- a worker instance that stops consuming (its main process stopped with SIGSTOP: it still runs
  for systemd, holds its broker connection and its reserved tasks, and answers nothing) is
  restarted within the detection window (by the watchdog, or the check: whichever comes first),
  and every other instance, on this host and the others, keeps running untouched;
- a worker whose process is blocked while it runs tasks (a C call holding the GIL: its event
  loop stops) is aborted and restarted by systemd's watchdog, while the prefork worker of the
  same queue, whose children hold the same tasks but whose event loop turns, is left alone;
- what a check costs, next to what `celery inspect ping` costs for one instance (printed).
The load suite (test_load.py) proves the other side: a busy worker is never restarted.

The stop tests drive two hosts, so they run once rather than once per host.
"""

import json
import pathlib
import re
import sys
import time

# The scenarios' shared test helpers (molecule/shared/tests/stack_hosts.py).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "tests"))
from stack_hosts import VENV_PYTHON, group_hosts, inventory_host  # noqa: E402

WORKERS = group_hosts("celery_workers")
HEALTH = "celery-worker-health"

testinfra_hosts = [f"ansible://{name}" for name in WORKERS]


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
    hosts = {name: inventory_host(name) for name in WORKERS}
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
    by_check = f"restarted celery-worker@{stuck}.service: no answer to {failures} pings in a row" in _health_log(
        stuck_host, "-10min")
    by_watchdog = "Watchdog timeout" in _journal(stuck_host, stuck, "-10min")
    print(f"\n{stuck} stopped with SIGSTOP: restarted after {time.time() - stopped_at:.0f} s by "
          f"{'the watchdog' if by_watchdog else 'the health check'} (interval {interval} s, {failures} missed "
          f"pings, window {window:.0f} s)")
    assert by_check or by_watchdog
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


def _journal(host, instance, since):
    return host.check_output(f"journalctl -u celery-worker@{instance}.service --since {since} --no-pager -o cat")


def _watchdog_seconds(host, instance):
    usec = host.check_output(f"systemctl show -p WatchdogUSec --value celery-worker@{instance}.service")
    return sum(int(n) * {"min": 60, "s": 1}[u] for n, u in re.findall(r"(\d+)(min|s)", usec))


def test_a_blocked_worker_is_restarted_by_the_watchdog_and_the_busy_one_is_not():
    """cpu runs on worker1 only (routing table: hosts celery_cpu_workers): its prefork and its
    threads worker each take tasks that hold the GIL for 40 s. The threads worker's event loop
    stops with them; the prefork worker's children stop, its loop turns."""
    host = inventory_host(WORKERS[0])
    before = _main_pids(host)
    watchdog = _watchdog_seconds(host, "cpu-threads")
    assert watchdog > 0
    since = "@" + host.check_output("date +%s")
    hold = 40
    sender = f"""
import time
from celery_stack_app import app
until = time.time() + {hold}
# two per consumer (concurrency 2 x prefetch 1): RabbitMQ hands them round robin to both workers
print([app.send_task("celery_stack_demo.tasks.hold_gil", (until,), queue="cpu").id for _ in range(4)])
"""
    host.check_output(f"cat > /root/hold.py <<'EOF'\n{sender}\nEOF")
    host.check_output("set -a; . /etc/celery-stack/celery.env; set +a; "
                      f"{VENV_PYTHON} /root/hold.py")
    sent = time.time()
    # WatchdogSec after the last keep-alive, then TimeoutAbortSec (10 s) and the start
    window = watchdog + 10 + 60
    while "Watchdog timeout" not in _journal(host, "cpu-threads", since):
        assert time.time() - sent < window, _journal(host, "cpu-threads", since)
        time.sleep(1)
    print(f"\ncpu-threads blocked: systemd's watchdog ({watchdog} s) fired {time.time() - sent:.0f} s after the "
          "tasks were sent")
    # the prefork worker held the same tasks in its children: busy, never restarted
    time.sleep(max(0.0, sent + hold + 5 - time.time()))
    after = _main_pids(host)
    assert after["cpu-prefork"] == before["cpu-prefork"]
    assert {k: v for k, v in after.items() if not k.startswith("cpu-")} == \
        {k: v for k, v in before.items() if not k.startswith("cpu-")}
    assert "restarted celery-worker@cpu-prefork" not in _health_log(host, since)
    # and the restarted threads worker consumes again
    deadline = time.time() + 120
    node = f"cpu-threads@{host.check_output('hostname')}"
    while not host.run(f"/opt/celery-stack/bin/celery-stack inspect ping --timeout 2 -d {node}").succeeded:
        assert time.time() < deadline, f"{node} does not answer after its restart"
        time.sleep(2)


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
        f"{VENV_PYTHON} /root/health-cost.py '{argv}' {node}").split())
    count = len(_instances(host))
    print(f"\n{host.check_output('hostname')}: one health check of its {count} instances {check_cpu:.2f} s CPU; "
          f"`celery inspect ping` per instance {ping_cpu:.2f} s CPU, x {count} = {ping_cpu * count:.2f} s "
          f"({ping_cpu * count / check_cpu:.1f} x the check)")
