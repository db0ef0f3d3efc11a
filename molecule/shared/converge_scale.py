#!/usr/bin/env python3
"""How a converge grows with the number of worker hosts: the local stack (inventories/local) with
1, 2, 4 and 8 worker hosts, each size from fresh containers (cold: the first site.yml), then
site.yml again `--warm` times (warm: nothing to change; the recap must say changed=0 on every
host, else the row says so). Prints one table row per size and the warm ratio to 1 host.

    make converge-table                  # or: python molecule/shared/converge_scale.py [1 2 4 8]

It replaces the local stack (`make down` first; `make up` brings the usual one back). The sizes
run one after the other on the same machine, so the rows are comparable with each other, not with
another machine's.
"""

import argparse
import copy
import os
import re
import statistics
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


def converge(inventory):
    """site.yml once: (seconds, changed count per host)."""
    started = time.monotonic()
    done = subprocess.run(["ansible-playbook", "-i", str(inventory), "site.yml"], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-2000:])
        raise SystemExit(f"site.yml failed on {inventory}")
    changed = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s*:\s*ok=\d+\s+changed=(\d+)", done.stdout, re.M)}
    return seconds, changed


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
            cold, _ = converge(inventory)
            warm = [converge(inventory) for _ in range(warm_runs)]
        finally:
            if not keep:
                run([stack, "down"], env=env, stdout=subprocess.DEVNULL)
    changed = sorted({host for _, per_host in warm for host, n in per_host.items() if n})
    return {"workers": count, "cold": cold, "warm": statistics.median(s for s, _ in warm),
            "warm_range": (min(s for s, _ in warm), max(s for s, _ in warm)), "changed": changed}


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
          f"{'warm / 1 host':>14}  warm changed=0", flush=True)
    for count in args.sizes:
        row = measure(count, args.warm, args.keep)
        rows.append(row)
        ratio = row["warm"] / rows[0]["warm"]
        low, high = row["warm_range"]
        print(f"{count:>12} {count + 4:>6} {row['cold']:>8.1f} {row['warm']:>16.1f} {f'{low:.1f}-{high:.1f}':>14} "
              f"{ratio:>13.2f}x  {'yes' if not row['changed'] else 'NO: ' + ', '.join(row['changed'])}",
              flush=True)


if __name__ == "__main__":
    main()
