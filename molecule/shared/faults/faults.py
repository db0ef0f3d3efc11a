"""The fault suite: what each fault costs a running stack, one table row per fault.

For each fault: a burst of I/O tasks (crawl_probe, queue io) is sent from the producer host by
probe.py with the deployment's own settings; a moment after the burst is published, the fault
strikes; then every result is read back. Each row counts:

  sent        tasks published (a publish that raised is shown apart, as "refused");
  completed   tasks whose result reads SUCCESS;
  failed      tasks whose result reads FAILURE (crawl_probe never fails: every one is wrong);
  stuck       tasks without a final state (PENDING, STARTED) when the client gave up (--wait
              seconds after sending): the client cannot tell them from queued or running ones;
              "never ran": of those, the ones no worker completed (the message was lost);
  dup         tasks that ran to completion more than once (at-least-once delivery);
  outage s    how long the fault lasted: until the faulted part answered again (a deploy: until
              the converge ended);
  stall s     the longest time without any task completing, after the fault struck;
  client s    the longest time a client's get() waited for the next result after the fault;
  missed      get() calls that gave up at the client's deadline although the result was stored
              (a read right after): the client missed the result's notification;
  consumers   the fewest consumers each routed queue had while the fault lasted (RabbitMQ).

Completions are read from the probe logs the task writes on the worker hosts. The hosts are
containers of the inventory (the local stack, a Molecule scenario): faults that restart or
kill a host use docker, the others systemctl inside the host.

  python molecule/shared/faults/faults.py -i inventories/local [-i OTHER_INVENTORY=fault,fault]
         [--tasks 1000] [--only fault,fault] [--json FILE]

Several inventories (stacks) give one table, e.g. the bundle's default next to the original
note's Redis-broker setup (make faults).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
import uuid

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[2]
PROBE_ON_HOST = "/var/tmp/celery-stack-probe.py"
PROBE_DIR = "/var/lib/celery-stack"


def sh(*argv, check=True):
    result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO)  # ansible.cfg
    if check and result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr or result.stdout}")
    return result


def on(host, command, check=True):
    """A shell command inside a host, as root."""
    return sh("docker", "exec", host, "sh", "-c", command, check=check)


def wait_until(host, command, timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        if on(host, command, check=False).returncode == 0:
            return
        time.sleep(0.5)
    raise SystemExit(f"{host}: `{command}` did not succeed within {timeout} s")


def inventory_listing(inventory):
    return json.loads(sh(str(pathlib.Path(sys.executable).parent / "ansible-inventory"),
                         "-i", inventory, "--list").stdout)


def inventory_groups(listing):
    groups = {}

    def walk(name):
        node = listing.get(name, {})
        hosts = list(node.get("hosts", []))
        for child in node.get("children", []):
            hosts += walk(child)
        return list(dict.fromkeys(hosts))

    for name in listing:
        if name != "_meta":
            groups[name] = walk(name)
    return groups


class Stack:
    def __init__(self, inventory):
        listing = inventory_listing(inventory)
        groups = inventory_groups(listing)
        self.inventory = inventory
        path = pathlib.Path(inventory)
        # inventories/<name>, or a Molecule scenario's generated inventory file
        self.name = path.name if path.is_dir() else os.environ.get("MOLECULE_SCENARIO_NAME", path.stem)
        self.brokers = groups.get("rabbitmq", [])
        self.redis = groups.get("redis", [])
        self.workers = groups["celery_workers"]
        producers = [h for h in groups.get("celery_producers", []) if h not in self.workers]
        self.producer = (producers or self.workers)[0]
        stack_vars = listing.get("_meta", {}).get("hostvars", {}).get(self.producer, {})
        self.stack_vars = stack_vars  # the inventory's variables (group all), as the producer sees them
        self.vhost = str(stack_vars.get("celery_stack_broker_vhost", "/"))
        self.queues = [queue["name"] for queue in stack_vars.get("celery_stack_queues", [])]

    def consumers(self):
        """{queue: consumers} of the routed queues, as the first broker sees them."""
        listing = on(self.brokers[0], f"rabbitmqctl -q list_queues -p '{self.vhost}' name consumers --formatter json",
                     check=False).stdout
        try:
            return {q["name"]: int(q["consumers"]) for q in json.loads(listing or "[]") if q["name"] in self.queues}
        except ValueError:  # the node is busy or restarting: no sample this time
            return {}

    def settle(self, expected, timeout=300):
        """Wait until every routed queue has its consumers back (all the workers consume again
        after the previous fault), so that a row measures its own fault only."""
        if not self.brokers:
            return
        end = time.time() + timeout
        while self.consumers() != expected:
            if time.time() > end:
                raise SystemExit(f"the workers did not all consume again within {timeout} s: "
                                 f"{self.consumers()} consumers, expected {expected}")
            time.sleep(1)

    # -- the services the faults need to see up again ---------------------------------------
    def rabbitmq_up(self, host):
        wait_until(host, "rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1")

    def redis_up(self, host):
        wait_until(host, "systemctl is-active -q redis-server")

    def workers_up(self, host):
        wait_until(host, "systemctl is-system-running --wait >/dev/null 2>&1; "
                         "! systemctl list-units --no-legend --state=activating,failed 'celery-worker@*' | grep -q .")

    def container_restarted(self, host, how):
        """reboot: systemd's own clean shutdown (SIGRTMIN+3 to the container's systemd stops
        every unit in order, the workers with a warm shutdown), then a boot; crash: SIGKILL of
        everything at once (an OOM kill, a power loss), then a boot."""
        if how == "reboot":
            sh("docker", "kill", "--signal", "SIGRTMIN+3", host)
            sh("timeout", "300", "docker", "wait", host)
        else:
            sh("docker", "kill", "--signal", "KILL", host)
        sh("docker", "start", host)
        # until the container runs commands again and its boot has finished (in any state)
        wait_until(host, "systemctl is-system-running --wait >/dev/null 2>&1 || true", timeout=60)


def io_units(host):
    listing = on(host, "systemctl list-units --no-legend --plain 'celery-worker@io-*' | awk '{print $1}'").stdout
    return listing.split()


# name -> (what it does, function(stack) that strikes and returns when the faulted part is back)
def _prefork_child_sigkill(stack):
    for host in stack.workers:
        on(host, "pkill -KILL -P $(systemctl show -p MainPID --value celery-worker@io-prefork.service)", check=False)


def _worker_restart(stack):
    for host in stack.workers:
        on(host, "systemctl restart " + " ".join(io_units(host)))


def _rabbitmq_restart(stack):
    on(stack.brokers[0], "systemctl restart rabbitmq-server")
    stack.rabbitmq_up(stack.brokers[0])


def _redis_restart(stack):
    on(stack.redis[0], "systemctl restart redis-server")
    stack.redis_up(stack.redis[0])


def _host_fault(group, how):
    """Reboot or crash the first host of a group (brokers, redis, workers), then wait until its
    service answers again."""
    def strike(stack):
        host = getattr(stack, group)[0]
        stack.container_restarted(host, how)
        {"brokers": stack.rabbitmq_up, "redis": stack.redis_up, "workers": stack.workers_up}[group](host)
    return strike


def _broker_node_down(stack):
    sh("docker", "kill", "--signal", "KILL", stack.brokers[-1])


def converge(stack, extra_vars):
    sh(str(pathlib.Path(sys.executable).parent / "ansible-playbook"), str(REPO / "site.yml"),
       "-i", stack.inventory, "--limit", "celery_workers", "-e", json.dumps(extra_vars))


def _rolling_deploy(stack):
    # A change of every worker's unit: each host's instances restart one at a time.
    converge(stack, {"celery_worker_log_level": "WARNING"})


def _rolling_deploy_back(stack):
    converge(stack, {})


def _rabbitmq_upgrade(stack):
    """playbooks/upgrade.yml to the newest build of rabbitmq-server the brokers' repository
    serves (the test mirror serves two builds of one release: +mirror1, +mirror2)."""
    installed = on(stack.brokers[0], "dpkg-query -W -f '${Version}' rabbitmq-server").stdout.strip()
    offered = on(stack.brokers[0], "apt-cache madison rabbitmq-server | awk '{print $3}'").stdout.split()
    newer = [v for v in offered
             if on(stack.brokers[0], f"dpkg --compare-versions '{v}' gt '{installed}'", check=False).returncode == 0]
    if not newer:
        raise SystemExit(f"rabbitmq-upgrade: nothing newer than {installed} to upgrade to (offered: {offered})")
    target = newer[0]  # madison lists the newest first
    print(f"  upgrading RabbitMQ {installed} -> {target}", flush=True)
    sh(str(pathlib.Path(sys.executable).parent / "ansible-playbook"), str(REPO / "playbooks" / "upgrade.yml"),
       "-i", stack.inventory, "-e", json.dumps({"rabbitmq_version": target}))


def _broker_node_back(stack):
    sh("docker", "start", stack.brokers[-1])
    stack.rabbitmq_up(stack.brokers[-1])


FAULTS = {
    "none": ("no fault (the baseline)", lambda stack: None),
    "prefork-child-kill": ("SIGKILL of the io prefork worker's pool processes", _prefork_child_sigkill),
    "worker-restart": ("systemctl restart of the io workers", _worker_restart),
    "rabbitmq-restart": ("systemctl restart rabbitmq-server", _rabbitmq_restart),
    "redis-restart": ("systemctl restart redis-server (the result store)", _redis_restart),
    # crash: SIGKILL to every process of the host (an OOM kill, a power loss), then a boot
    "redis-host-crash": ("the Redis host crashed, then booted", _host_fault("redis", "crash")),
    "worker-host-reboot": ("a worker host shut down cleanly by its systemd, then booted", _host_fault("workers", "reboot")),
    "worker-host-crash": ("a worker host crashed, then booted", _host_fault("workers", "crash")),
    "broker-host-crash": ("a broker host crashed, then booted", _host_fault("brokers", "crash")),
    "broker-node-down": ("one of several broker nodes killed for the run", _broker_node_down),
    "rolling-deploy": ("site.yml changing every worker while tasks are sent", _rolling_deploy),
    "rabbitmq-upgrade": ("playbooks/upgrade.yml: every broker node upgraded while tasks are sent", _rabbitmq_upgrade),
}
# Put back after the run (not part of the fault's timing).
AFTER = {"broker-node-down": _broker_node_back, "rolling-deploy": _rolling_deploy_back}
# Tasks sent over this many seconds rather than at once, and the fault strikes while they are
# sent: a deploy takes longer than a burst lasts.
SPREAD = {"rolling-deploy": 60, "rabbitmq-upgrade": 120}
NEEDS = {"broker-node-down": lambda stack: len(stack.brokers) > 1,
         # a single node cannot be drained: its clients would have nowhere to go
         "rabbitmq-upgrade": lambda stack: len(stack.brokers) > 1,
         "rabbitmq-restart": lambda stack: bool(stack.brokers),
         "broker-host-crash": lambda stack: bool(stack.brokers),
         "redis-restart": lambda stack: bool(stack.redis),
         "redis-host-crash": lambda stack: bool(stack.redis)}


class ConsumerWatch:
    """While a fault lasts, count the routed queues' consumers on the broker (rabbitmqctl: one
    sample every 2 s or so) and keep the fewest seen per queue."""

    def __init__(self, stack):
        self.stack, self.fewest, self.samples = stack, {}, []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def watch(self):
        while not self.done.is_set():
            counts = self.stack.consumers()
            self.samples.append((round(time.time(), 1), counts))
            for queue, count in counts.items():
                self.fewest[queue] = min(count, self.fewest.get(queue, count))
            self.done.wait(0.2)

    def __enter__(self):
        if self.stack.brokers:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()


def completions(stack, run):
    """(index, unix time) of every completed execution, from the probe logs of all worker hosts."""
    found = []
    for host in stack.workers:
        text = on(host, f"cat {PROBE_DIR}/probe-{run}.log 2>/dev/null; rm -f {PROBE_DIR}/probe-{run}.log",
                  check=False).stdout
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3:
                found.append((int(parts[0]), float(parts[2])))
    return found


def longest_gap(times, since):
    points = sorted([since] + [t for t in times if t >= since])
    return max((b - a for a, b in zip(points, points[1:])), default=0.0)


def run_fault(stack, name, args):
    run = f"{name}-{uuid.uuid4().hex[:8]}"
    spread = SPREAD.get(name, 0)
    spec = {"run": run, "tasks": args.tasks, "seconds": args.seconds, "spread": spread, "wait": args.wait + spread}
    client = subprocess.Popen(
        ["docker", "exec", stack.producer, args.python, PROBE_ON_HOST, json.dumps(spec)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for expected in ("started",) if spread else ("started", "sent"):
        line = client.stdout.readline()
        if not line.startswith(expected + " "):
            raise SystemExit(f"the probe did not start: {line}{client.stderr.read()}")
    time.sleep(args.delay)
    struck = time.time()
    with ConsumerWatch(stack) as watch:
        FAULTS[name][1](stack)
        back = time.time()
    out, err = client.communicate()
    if client.returncode != 0:
        raise SystemExit(f"the probe failed: {err}")
    if name in AFTER:
        AFTER[name](stack)
    report = json.loads(out.strip().splitlines()[-1])
    done = completions(stack, run)
    runs = {}
    for index, _ in done:
        runs[index] = runs.get(index, 0) + 1
    states = {int(i): state for i, state in report["states"].items()}
    pending = [i for i, state in states.items() if state not in ("SUCCESS", "FAILURE")]
    return {
        "setup": stack.name,
        "fault": name,
        "sent": report["sent"],
        "refused": report["refused"],
        "completed": sum(1 for state in states.values() if state == "SUCCESS"),
        "failed": sum(1 for state in states.values() if state == "FAILURE"),
        "stuck": len(pending),
        "never_ran": sum(1 for i in pending if i not in runs),
        "dup": sum(1 for count in runs.values() if count > 1),
        "stall": round(longest_gap([t for _, t in done], struck), 1) if name != "none" else 0.0,
        # with tasks still being sent, get() waits for the sending too: not a fault figure
        "client": round(longest_gap(report["get_ended"], struck), 1) if name != "none" and not spread else "-",
        "missed": len(report["get_missed"]),
        "outage": round(back - struck, 1),
        # the fewest consumers a routed queue had while the fault lasted (measured for deploys)
        "consumers": " ".join(f"{q}:{n}" for q, n in sorted(watch.fewest.items())) or "-",
        "consumer_samples": watch.samples,
        "get_errors": report["get_errors"],
        "notes": report["get_error_kinds"] + report["refused_errors"],
    }


COLUMNS = (("setup", 18), ("fault", 20), ("sent", 6), ("refused", 8), ("completed", 10), ("failed", 7), ("stuck", 6),
           ("never_ran", 10), ("dup", 4), ("outage", 7), ("stall", 6), ("client", 7), ("missed", 6),
           ("consumers", 12))


def table(rows, columns=COLUMNS):
    head = "| " + " | ".join(name.replace("_", " ").ljust(width) for name, width in columns) + " |"
    rule = "|" + "|".join("-" * (width + 2) for _, width in columns) + "|"
    lines = [head, rule]
    for row in rows:
        lines.append("| " + " | ".join(str(row[name]).ljust(width) for name, width in columns) + " |")
    return "\n".join(lines)


def run_stack(stack, only, args):
    names = [n for n in (only.split(",") if only else FAULTS) if n]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise SystemExit(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    names = [n for n in names if NEEDS.get(n, lambda s: True)(stack)]
    sh("docker", "cp", str(HERE / "probe.py"), f"{stack.producer}:{PROBE_ON_HOST}")
    print(f"{stack.inventory}: {args.tasks} tasks of {args.seconds} s per fault, sent from {stack.producer}; "
          f"the fault strikes {args.delay} s after the burst is published", flush=True)
    # every queue's consumers as the stack runs now: each fault starts from the same state
    expected = stack.consumers() if stack.brokers else {}
    if stack.brokers and sorted(expected) != sorted(stack.queues):
        raise SystemExit(f"not every routed queue {stack.queues} has consumers: {expected}")
    rows = []
    for name in names:
        print(f"- {name}: {FAULTS[name][0]} ...", flush=True)
        stack.settle(expected)
        rows.append(run_fault(stack, name, args))
        row = rows[-1]
        print(f"  completed {row['completed']}/{row['sent']}, failed {row['failed']}, stuck {row['stuck']}, "
              f"dup {row['dup']}, stall {row['stall']} s, client {row['client']} s, missed {row['missed']}"
              + (f"; notes: {row['notes']}" if row["notes"] else ""), flush=True)
    stack.settle(expected)  # the last fault too: every worker consumes again
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--inventory", action="append", metavar="INVENTORY[=FAULT,...]",
                        help="a stack of container hosts, optionally with its own faults (default: "
                             "inventories/local, every fault that applies)")
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per fault (default 1000)")
    parser.add_argument("--seconds", type=float, default=0.1, help="each task's duration (default 0.1)")
    parser.add_argument("--delay", type=float, default=1.0,
                        help="seconds between the burst being published and the fault (default 1)")
    parser.add_argument("--wait", type=float, default=120.0,
                        help="how long the client waits for results after sending (default 120)")
    parser.add_argument("--only", default="", help="comma-separated faults (default: all that apply)")
    parser.add_argument("--python", default="/opt/celery-stack/venv/bin/python",
                        help="the deployment's venv python on the producer host")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    rows = []
    for spec in args.inventory or [str(REPO / "inventories" / "local")]:
        inventory, _, only = spec.partition("=")
        rows += run_stack(Stack(inventory), only or args.only, args)
    print()
    print(table(rows))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
