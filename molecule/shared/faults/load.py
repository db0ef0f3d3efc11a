"""The load suite: what a burst, or a steady rate, does to the workers, one table row per load.

Bursts per queue and pool, each on a worker configuration applied by a converge of the workers
(site.yml --limit celery_workers -e ...): the inventory's routing table with ONE pool per queue,
so a row measures that pool alone (io on threads at concurrency 32, the README's example; cpu on
prefork), with monitoring (task events) on or off and the health check at the role's defaults
or at the inventory's settings. Then the inventory's own configuration is put back and a soak
sends I/O-wait tasks at a steady rate to it as deployed. Rows:

  instant-2k   2,000 tasks that return at once, io on threads (the key row: the deadlock of the
               threads worker with events and publisher confirms, in Celery 5.7)
  instant-10k  10,000 of them
  iowait       2,000 tasks waiting 100 ms, io on threads
  cpu          400 tasks computing 50 ms of CPU each, cpu on prefork
  iowait-drain, cpu-drain
               the same, sent while the row's workers are stopped, then drained: the workers'
               own rate, which the producers (sharing the machine's CPUs) do not slow down
  soak         --soak-rate tasks/s of 100 ms for --soak-seconds, on the inventory's configuration

Tasks are sent from the producer host by load_client.py (several publishing processes: one is
capped by publisher confirms) and log their completion on the worker hosts (probe logs, as in
the fault suite). Columns:

  sent, completed   tasks published; tasks whose result reads SUCCESS
  stuck             tasks without a final state when the client gave up (--patience seconds
                    without a completion)
  lost              tasks that never ran (not in the probe logs)
  tasks/s           completed / (last completion - first send; drain rows: - the workers' start)
  bound             what the row can reach at most: the pool's concurrency x instances / task
                    time, and never more than the producers' measured publish rate (instant
                    tasks: that rate); soak: the rate sent
  ratio             tasks/s / bound
  pub/s, proc pub/s the producers' publish rate in all, and that of one producer process
  p50, p99          latency send -> completion, seconds
  stall             the longest time without a completion while tasks were outstanding
  main cpu          CPU of the row's worker main process while the row ran, in cores (the threads
                    worker's whole process: near 1.0 it is bound by one core, its GIL, not by its
                    concurrency; prefork: the parent only)
  loop late         how late the row's workers' event loop ran its timer at most (seconds; the
                    watchdog acts after WatchdogSec / 2): since the worker started
  hc restarts       "restarted" lines of celery-worker-health.service during the row
  restarts          starts of any celery-worker@ unit during the row (a watchdog, a health
                    check or a crash restarting it)

  python molecule/shared/faults/load.py [-i inventories/local] [--only instant-2k,iowait]
         [--monitoring on,off] [--health inventory,defaults] [--tasks iowait=500]
         [--soak-seconds 600] [--json FILE]

Exits non-zero when a row has stuck or lost tasks or saw a health-check restart (every worker
of a burst row's pool is busy, the others idle: a restart is never of a dead worker here).
"""

import argparse
import copy
import json
import pathlib
import sys
import time
import uuid

import yaml
from faults import HERE, PROBE_DIR, REPO, Stack, completions, converge, on, sh, table

CLIENT_ON_HOST = "/var/tmp/celery-stack-load-client.py"
CRAWL, CPU_TASK = "celery_stack_demo.tasks.crawl_probe", "celery_stack_demo.tasks.cpu_probe"
# The demo app's queues: the routing table of inventories/local (which the scenarios link)
# sends crawl* to io and cpu_* to cpu.
IO, CPU = "io", "cpu"
THREADS_CONCURRENCY = 32
# name -> (queue, pool, task, seconds per task, tasks)
ROWS = {
    "instant-2k": (IO, "threads", CRAWL, 0, 2000),
    "instant-10k": (IO, "threads", CRAWL, 0, 10000),
    "iowait": (IO, "threads", CRAWL, 0.1, 2000),
    "cpu": (CPU, "prefork", CPU_TASK, 0.05, 400),
    "iowait-drain": (IO, "threads", CRAWL, 0.1, 2000),
    "cpu-drain": (CPU, "prefork", CPU_TASK, 0.05, 400),
}
HEALTH_VARS = ("celery_worker_health_interval", "celery_worker_health_failures", "celery_worker_health_timeout")
ROLE_DEFAULTS = yaml.safe_load((REPO / "roles" / "celery_worker" / "defaults" / "main.yml").read_text())


def burst_queues(queues):
    """The routing table with one pool per queue: io on threads at THREADS_CONCURRENCY (prefork
    off), cpu on prefork (threads off), every other setting as the inventory has it."""
    queues = copy.deepcopy(queues)
    for queue in queues:
        pools = queue.setdefault("pools", {})
        keep, drop = {IO: ("threads", "prefork"), CPU: ("prefork", "threads")}.get(queue["name"], (None, None))
        if keep:
            pools[keep] = {**pools.get(keep, {}), "enabled": True}
            pools[drop] = {"enabled": False}
        if queue["name"] == IO:
            pools["threads"]["concurrency"] = THREADS_CONCURRENCY
    return queues


def health_settings(stack, which):
    """The health check's (interval, failures, timeout): the role's defaults or the inventory's."""
    source = ROLE_DEFAULTS if which == "defaults" else {**ROLE_DEFAULTS, **stack.stack_vars}
    return tuple(int(source[name]) for name in HEALTH_VARS)


def instances(stack):
    """{queue: active worker instances}: what each routed queue's consumers must number."""
    counts = {}
    for host in stack.workers:
        units = on(host, "systemctl list-units --no-legend --plain --state=active 'celery-worker@*.service'"
                         " | awk '{print $1}'").stdout.split()
        for unit in units:
            queue = unit.split("@", 1)[1].removesuffix(".service").rsplit("-", 1)[0]
            counts[queue] = counts.get(queue, 0) + 1
    return counts


def deploy(stack, extra_vars, label):
    print(f"- converge of the workers: {label} ...", flush=True)
    started = time.time()
    converge(stack, extra_vars)
    for host in stack.workers:
        stack.workers_up(host)
    expected = instances(stack)
    stack.settle(expected)
    print(f"  {time.time() - started:.0f} s; consumers {expected}", flush=True)
    return expected


def client(stack, python, mode, spec):
    out = sh("docker", "exec", stack.producer, python, CLIENT_ON_HOST, mode, json.dumps(spec)).stdout
    return json.loads(out.strip().splitlines()[-1])


def journal_lines(host, unit, since, pattern):
    return on(host, f"journalctl -q -o cat -u '{unit}' --since @{int(since)} | grep '{pattern}'",
              check=False).stdout.splitlines()


def ran(stack, run):
    """How many distinct tasks have logged their completion so far."""
    return sum(int(on(host, f"cut -d' ' -f1 {PROBE_DIR}/probe-{run}.log 2>/dev/null | sort -u | wc -l",
                      check=False).stdout.strip() or 0) for host in stack.workers)


def longest_stall(sends, dones, end):
    """The longest time without a completion while some task was outstanding (sent, not yet
    completed); a task that never completed is outstanding until `end`, when the client gave up."""
    outstanding, since, longest = 0, 0.0, 0.0
    for at, step in sorted([(t, 1) for t in sends] + [(t, -1) for t in dones]):
        if step > 0 and outstanding == 0:
            since = at
        elif step < 0:
            longest, since = max(longest, at - since), at
        outstanding += step
    return max(longest, end - since) if outstanding > 0 else longest


def loop_delay(stack, unit):
    """The longest delay of the event loops of `unit`'s workers (their progress.json), or None."""
    delays = []
    for host in stack.workers:
        out = on(host, f"cat /run/celery-worker/{unit}/progress.json", check=False).stdout
        try:
            delays.append(float(json.loads(out)["loop_delay"]))
        except (ValueError, KeyError):
            continue
    return max(delays, default=None)


def main_cpu(stack, unit):
    """CPU seconds (user + system) of the main process of `unit` on each worker host: with the
    threads pool, the whole worker (its threads run in that process)."""
    seconds = {}
    for host in stack.workers:
        out = on(host, f"cat /proc/$(systemctl show -p MainPID --value {unit})/stat 2>/dev/null", check=False).stdout
        fields = out.rsplit(")", 1)[-1].split()
        if len(fields) > 12:
            seconds[host] = (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks
    return seconds


def percentile(values, fraction):
    return sorted(values)[min(len(values) - 1, int(fraction * len(values)))] if values else 0.0


def run_row(stack, args, name, spec, config, consumers):
    queue, pool, task, seconds, tasks, rate = spec
    run = f"load-{name}-{uuid.uuid4().hex[:8]}"
    for routed in stack.queues:  # every row starts from empty queues (a stuck row leaves messages)
        on(stack.brokers[0], f"rabbitmqctl -q purge_queue -p '{stack.vhost}' '{routed}'")
    drain = name.endswith("-drain")
    unit = f"celery-worker@{queue}-{pool}.service"
    hosts = [host for host in stack.workers
             if drain and on(host, f"systemctl is-active -q {unit}", check=False).returncode == 0]
    started = time.time()
    for host in hosts:  # a drain row: the burst waits in the queue until the workers start
        on(host, f"systemctl stop {unit}")
    report = client(stack, args.python, "send", {"run": run, "task": task, "seconds": seconds, "tasks": tasks,
                                                 "producers": 1 if rate else args.producers, "rate": rate})
    sent = {int(index): at for index, at in report["sent"].items()}
    consuming = min(sent.values(), default=0)
    for host in hosts:  # Type=notify: returns once the worker consumes
        on(host, f"systemctl start {unit}")
    if drain:
        consuming = time.time()
    cpu_before = main_cpu(stack, unit)
    last, progress = time.time(), 0
    while progress < len(sent) and time.time() - last < args.patience:
        time.sleep(1)
        now = ran(stack, run)
        if now > progress:
            last, progress = time.time(), now
    gave_up = time.time()
    time.sleep(2)  # a task logs its completion just before its result is stored
    states = client(stack, args.python, "states", {"run": run, "tasks": tasks})
    done = {}
    for index, at in completions(stack, run):
        done[index] = min(at, done.get(index, at))
    stuck = [index for index in states["not_final"] if index in sent]
    completed = states["states"].get("SUCCESS", 0)
    span = max(done.values(), default=0) - consuming
    rate_done = completed / span if span > 0 else 0.0
    if rate:
        bound = rate
    else:
        concurrency = next(q for q in config["queues"] if q["name"] == queue)["pools"][pool].get("concurrency", 1)
        work = concurrency * consumers.get(queue, 0) / seconds if seconds else float("inf")
        bound = work if drain else min(work, report["publish_rate"])
    latencies = [done[index] - sent[index] for index in done if index in sent]
    cpu_after, busy = main_cpu(stack, unit), max(done.values(), default=consuming) - consuming
    main_load = max((cpu_after[h] - cpu_before[h] for h in cpu_after if h in cpu_before), default=0.0)
    health, starts, watchdog = ([line for host in stack.workers for line in journal_lines(host, unit, started, pattern)]
                                for unit, pattern in (("celery-worker-health.service", "^restarted "),
                                                      ("celery-worker@*", "^Started "),
                                                      ("celery-worker@*", "Watchdog timeout")))
    return {
        "setup": stack.name, "row": name, "pool": f"{queue} {pool}", "config": config["label"],
        "sent": len(sent), "refused": report["refused"], "completed": completed, "stuck": len(stuck),
        "lost": sum(1 for index in sent if index not in done),
        "tasks_s": round(rate_done, 1), "bound": round(bound, 1), "ratio": round(rate_done / bound, 2) if bound else 0,
        "pub_s": round(report["publish_rate"], 1), "proc_pub_s": round(report["producer_rate"], 1),
        "p50": round(percentile(latencies, 0.5), 2), "p99": round(percentile(latencies, 0.99), 2),
        # a drain row's tasks wait for the workers on purpose: counted from their start
        "stall": round(longest_stall([max(at, consuming) for at in sent.values()], done.values(), gave_up), 1),
        "main_cpu": round(main_load / busy, 2) if busy > 0 else 0.0,
        # the drain row's own start of its workers is no restart
        "loop_late": loop_delay(stack, f"{queue}-{pool}"),
        "hc_restarts": len(health), "restarts": len(starts) - len(hosts), "journal": health + starts + watchdog,
        "started": started, "gave_up": gave_up, "states": states["states"],
        "refused_errors": report["refused_errors"],
    }


COLUMNS = (("row", 11), ("pool", 10), ("config", 17), ("sent", 5), ("completed", 9), ("stuck", 5), ("lost", 4),
           ("tasks_s", 7), ("bound", 6), ("ratio", 5), ("pub_s", 6), ("proc_pub_s", 10), ("p50", 5), ("p99", 5),
           ("stall", 5), ("main_cpu", 8), ("loop_late", 9), ("hc_restarts", 11), ("restarts", 8))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--inventory", default=str(REPO / "inventories" / "local"))
    parser.add_argument("--only", default=",".join(ROWS), help=f"burst rows, comma-separated (default: {','.join(ROWS)})")
    parser.add_argument("--monitoring", default="on,off", help="task events on, off or both (default on,off)")
    parser.add_argument("--health", default="inventory,defaults",
                        help="health check at the inventory's settings, the role's defaults or both")
    parser.add_argument("--tasks", action="append", default=[], metavar="ROW=N", help="tasks of a burst row")
    parser.add_argument("--producers", type=int, default=4, help="publishing processes of a burst (default 4)")
    parser.add_argument("--patience", type=float, default=150.0,
                        help="give up after this many seconds without a completion (default 150: longer than "
                             "the hanging stop of a busy threads worker once seen, so a recovery shows as a stall)")
    parser.add_argument("--soak-seconds", type=float, default=600.0, help="soak duration (default 600; 0: none)")
    parser.add_argument("--soak-rate", type=float, default=20.0, help="soak tasks/s (default 20)")
    parser.add_argument("--python", default="/opt/celery-stack/venv/bin/python",
                        help="the deployment's venv python on the producer host")
    parser.add_argument("--json", help="also write the rows to this file")
    return parser.parse_args()


def bursts(stack, args, rows):
    """Every burst row on every worker configuration asked for; the inventory's own
    configuration is put back afterwards (also when a row fails)."""
    queues = burst_queues(stack.stack_vars["celery_stack_queues"])
    results = []
    try:
        for monitoring in args.monitoring.split(","):
            for health in args.health.split(","):
                settings = health_settings(stack, health)
                config = {"label": f"mon {monitoring}, hc {settings[0]}s/{settings[1]}", "queues": queues}
                consumers = deploy(stack, {"celery_stack_queues": queues, "celery_stack_monitoring": monitoring == "on",
                                           **dict(zip(HEALTH_VARS, settings))}, config["label"])
                for name, spec in rows.items():
                    print(f"- {name}: {spec[4]} tasks on {spec[0]} {spec[1]}, {config['label']} ...", flush=True)
                    results.append(run_row(stack, args, name, (*spec, 0), config, consumers))
                    row = results[-1]
                    print(f"  completed {row['completed']}/{row['sent']}, stuck {row['stuck']}, lost {row['lost']}, "
                          f"{row['tasks_s']} tasks/s, hc restarts {row['hc_restarts']}, restarts {row['restarts']}",
                          flush=True)
    finally:
        deploy(stack, {}, "the inventory's own configuration")
    return results


def soak(stack, args):
    """I/O-wait tasks at a steady rate to the workers as the inventory deploys them."""
    tasks = int(args.soak_rate * args.soak_seconds)
    label = f"inventory, mon {'on' if stack.stack_vars.get('celery_stack_monitoring') else 'off'}"
    print(f"- soak: {tasks} tasks at {args.soak_rate}/s to {IO} ({label}) ...", flush=True)
    return run_row(stack, args, "soak", (IO, "pools", CRAWL, 0.1, tasks, args.soak_rate),
                   {"label": label, "queues": stack.stack_vars["celery_stack_queues"]}, {})


def main():
    args = parse_args()
    stack = Stack(args.inventory)
    rows = {name: ROWS[name] for name in args.only.split(",") if name}
    for item in args.tasks:
        name, _, count = item.partition("=")
        rows[name] = (*rows[name][:4], int(count))
    sh("docker", "cp", str(HERE / "load_client.py"), f"{stack.producer}:{CLIENT_ON_HOST}")
    results = bursts(stack, args, rows) if rows else []
    if args.soak_seconds:
        results.append(soak(stack, args))
    print()
    print(table(results, COLUMNS))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    failed = [row["row"] for row in results if row["stuck"] or row["lost"] or row["hc_restarts"]]
    if failed:
        print(f"\nFAILED: stuck, lost or health-check restarts in {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
