#!/usr/bin/env python3
"""How a converge grows with the number of worker hosts: the local stack (inventories/local) with
1, 2, 4 and 8 worker hosts, each size from fresh containers (cold: the first site.yml), then
site.yml again `--warm` times (warm: nothing to change; the recap must say changed=0 on every
host, else the row says so). Prints one table row per size and the warm ratio to 1 host, with
the CPU time of the median warm run: the controller's (ansible-playbook and its forks) and the
hosts' (the containers' cgroups, their idle workers included). Here the hosts are containers on
the controller's own cores, so both add up on one machine; on real hosts only the controller's
part is shared.

    make converge-table                  # or: python molecule/shared/converge_scale.py [1 2 4 8]

It replaces the local stack (`make down` first; `make up` brings the usual one back). The sizes
run one after the other on the same machine, so the rows are comparable with each other, not with
another machine's.
"""

import argparse
import copy
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "inventories" / "local"
FIRST_WORKER_IP = 31  # celery-stack-worker-1 is .31 in inventories/local; the others follow


def inventory_with_workers(count):
    """inventories/local's hosts with `count` worker hosts (worker-1 keeps the cpu queue and
    Flower; the others run the queues every worker host runs)."""
    hosts = yaml.safe_load((LOCAL / "hosts.yml").read_text())
    scaled = copy.deepcopy(hosts)
    workers = scaled["all"]["children"]["celery_workers"]["hosts"]
    template = workers["celery-stack-worker-1"]
    network = hosts["all"]["vars"]["local_container_subnet"].rsplit(".", 1)[0]
    for index in range(2, count + 1):
        entry = copy.deepcopy(template)
        entry["local_container"]["ip"] = f"{network}.{FIRST_WORKER_IP + index - 1}"
        workers[f"celery-stack-worker-{index}"] = entry
    return scaled


def run(argv, **kwargs):
    return subprocess.run(argv, cwd=ROOT, check=True, **kwargs)


def hosts_cpu_seconds():
    """CPU time the stack's containers have used so far (cgroup v1 cpuacct or v2 cpu.stat), or
    None where neither is readable. On this machine the "hosts" share the controller's cores."""
    ids = subprocess.run(["docker", "ps", "-q", "--no-trunc", "--filter", "label=celery-stack=host"],
                         capture_output=True, text=True, check=True).stdout.split()
    total = 0.0
    for container in ids:
        v1 = Path(f"/sys/fs/cgroup/cpuacct/docker/{container}/cpuacct.usage")
        v2 = Path(f"/sys/fs/cgroup/system.slice/docker-{container}.scope/cpu.stat")
        if v1.exists():
            total += int(v1.read_text()) / 1e9
        elif v2.exists():
            total += int(re.search(r"usage_usec (\d+)", v2.read_text()).group(1)) / 1e6
        else:
            return None
    return total


def converge(inventory):
    """site.yml once: (seconds, changed count per host, controller CPU s, hosts' CPU s)."""
    started, before, hosts_before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN), hosts_cpu_seconds()
    done = subprocess.run(["ansible-playbook", "-i", str(inventory), "site.yml"], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.monotonic() - started
    after, hosts_after = resource.getrusage(resource.RUSAGE_CHILDREN), hosts_cpu_seconds()
    controller = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    hosts = None if hosts_before is None or hosts_after is None else hosts_after - hosts_before
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-2000:])
        raise SystemExit(f"site.yml failed on {inventory}")
    changed = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s*:\s*ok=\d+\s+changed=(\d+)", done.stdout, re.M)}
    return seconds, changed, controller, hosts


def measure(count, warm_runs, keep=None):
    with tempfile.TemporaryDirectory(prefix=f"celery-stack-{count}-workers-") as tmp:
        inventory = Path(keep or tmp)
        inventory.mkdir(parents=True, exist_ok=True)
        (inventory / "hosts.yml").write_text(yaml.safe_dump(inventory_with_workers(count), sort_keys=False))
        if not (inventory / "group_vars").exists():
            os.symlink(LOCAL / "group_vars", inventory / "group_vars")
        env = dict(os.environ, CELERY_STACK_INVENTORY=str(inventory))
        stack = str(ROOT / "molecule" / "shared" / "local-stack.sh")
        run([stack, "down"], env=env, stdout=subprocess.DEVNULL)
        try:
            # Containers and the test-only prepare step (apt mirror) are not part of the converge.
            hosts = subprocess.run(["ansible-inventory", "-i", str(inventory), "--list"], cwd=ROOT, check=True,
                                   capture_output=True, text=True).stdout
            meta = yaml.safe_load(hosts)["_meta"]["hostvars"]
            for name, v in sorted(meta.items()):
                c = v["local_container"]
                run([str(ROOT / "molecule" / "shared" / "host.sh"), "up", name, str(c["debian"]),
                     v["local_container_network"], v["local_container_subnet"], c["ip"]])
            run(["ansible-playbook", "-i", str(inventory), "molecule/shared/prepare.yml"], stdout=subprocess.DEVNULL)
            cold = converge(inventory)[0]
            warm = [converge(inventory) for _ in range(warm_runs)]
        finally:
            if not keep:
                run([stack, "down"], env=env, stdout=subprocess.DEVNULL)
    changed = sorted({host for _, per_host, _, _ in warm for host, n in per_host.items() if n})
    median = sorted(warm, key=lambda w: w[0])[len(warm) // 2]  # the median run, with its CPU figures
    return {"workers": count, "cold": cold, "warm": median[0], "controller_cpu": median[2], "hosts_cpu": median[3],
            "warm_range": (min(w[0] for w in warm), max(w[0] for w in warm)), "changed": changed}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--warm", type=int, default=3, help="warm runs per size (median shown)")
    parser.add_argument("--keep", metavar="DIR", help="one size only: leave its stack up, its inventory in DIR "
                        "(to profile it: ansible-playbook -i DIR site.yml)")
    args = parser.parse_args()
    if args.keep and len(args.sizes) != 1:
        parser.error("--keep takes exactly one size")
    rows = []
    print(f"{'worker hosts':>12} {'hosts':>6} {'cold s':>8} {'warm s (median)':>16} {'warm range':>14} "
          f"{'warm / 1 host':>14} {'controller CPU s':>17} {'hosts CPU s':>12}  warm changed=0", flush=True)
    for count in args.sizes:
        row = measure(count, args.warm, args.keep)
        rows.append(row)
        ratio = row["warm"] / rows[0]["warm"]
        low, high = row["warm_range"]
        hosts_cpu = "-" if row["hosts_cpu"] is None else f"{row['hosts_cpu']:.1f}"
        print(f"{count:>12} {count + 4:>6} {row['cold']:>8.1f} {row['warm']:>16.1f} {f'{low:.1f}-{high:.1f}':>14} "
              f"{ratio:>13.2f}x {row['controller_cpu']:>17.1f} {hosts_cpu:>12}  "
              f"{'yes' if not row['changed'] else 'NO: ' + ', '.join(row['changed'])}", flush=True)


if __name__ == "__main__":
    main()
