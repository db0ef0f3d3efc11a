#!/usr/bin/env python3
"""The feature suite: Celery's canvas, control and result features, sent from a producer host as
the web app's account through the deployed stack (features_client.py runs there), one table row
each: ok, by design (refused or limited on purpose, with the reason), n/a (another backend's
code path) or FAIL. Across the suite, no worker may restart (a producer's shutdown broadcast
must not reach them): their MainPIDs are compared before and after. And Redis may refuse none of
the deployment's users a command, key or channel (its ACL LOG is read after the suite): the ACL
presets must cover every code path the rows take, Lua scripts included.

  python molecule/shared/faults/features.py -i inventories/local [--rows chain,chord]
      [--sizes chord_large=200] [--result-backend rpc] [--json FILE]

--result-backend rpc converges the stack to RabbitMQ reply queues for the run (site.yml with
celery_stack_result_backend=rpc) and back to the inventory's backend afterwards.
Container stacks only (it reaches the hosts with docker). Exits non-zero when a row FAILs.
"""

import argparse
import json
import os
import pathlib
import sys
import time

from faults import HERE, REPO, Stack, on, sh, table

CLIENT_ON_HOST = "/var/tmp/celery-stack-features.py"
# The deployment's CA bundle and each host's certificate and key <inventory name>.crt/.key
# (roles/tls), on every host when celery_stack_tls is on.
TLS_DIR = "/etc/celery-stack/tls"
TLS_CA = f"{TLS_DIR}/ca.crt"
COLUMNS = [("row", 22), ("status", 9), ("seconds", 7), ("detail", 100)]


def worker_pids(stack):
    """{host unit: MainPID} of every worker instance."""
    pids = {}
    for host in stack.workers:
        out = on(host, "systemctl show -p Id -p MainPID 'celery-worker@*.service'", check=False).stdout
        for block in out.strip().split("\n\n"):
            fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            if fields.get("Id"):
                pids[f"{host} {fields['Id']}"] = fields.get("MainPID")
    return pids


def redis_cli(stack, *args):
    """redis-cli as the Redis admin user on the stack's Redis host; the password travels in the
    environment (docker exec -e NAME passes the controller's value), not on a command line. Over
    TLS, checking the server against the deployment's CA bundle, when the host has one
    (celery_stack_tls: Redis then has no plain port), and showing the host's own certificate (which
    Redis requires with celery_stack_tls_client_certificates)."""
    os.environ["REDISCLI_AUTH"] = str(stack.stack_vars["redis_admin_password"])
    user = str(stack.stack_vars.get("redis_admin_user", "admin"))
    host = stack.redis[0]
    tls = (["--tls", "--cacert", TLS_CA, "--cert", f"{TLS_DIR}/{host}.crt", "--key", f"{TLS_DIR}/{host}.key"]
           if on(host, f"test -e {TLS_CA}", check=False).returncode == 0 else [])
    return sh("docker", "exec", "-e", "REDISCLI_AUTH", stack.redis[0], "redis-cli", "--no-auth-warning", *tls,
              "--user", user, *args).stdout


def acl_denials(stack):
    """The ACL LOG's refusals ({username, reason, object}), newest first; redis-cli prints each
    entry as alternating field and value lines."""
    lines = redis_cli(stack, "ACL", "LOG", "128").splitlines()
    denials, entry = [], {}
    for field, value in zip(lines[0::2], lines[1::2]):
        if field == "count" and entry:
            denials.append(entry)
            entry = {}
        entry[field] = value
    if entry:
        denials.append(entry)
    return [{k: d.get(k) for k in ("username", "reason", "object")} for d in denials]


def site(stack, extra_vars):
    print(f"- site.yml {json.dumps(extra_vars)} ...", flush=True)
    started = time.time()
    sh(str(pathlib.Path(sys.executable).parent / "ansible-playbook"), str(REPO / "site.yml"), "-i", stack.inventory,
       "-e", json.dumps(extra_vars))
    print(f"  {time.time() - started:.0f} s", flush=True)


def run_suite(stack, args):
    sh("docker", "cp", str(HERE / "features_client.py"), f"{stack.producer}:{CLIENT_ON_HOST}")
    user = stack.stack_vars.get("celery_app_user", "celery")
    spec = {"rows": [r for r in args.rows.split(",") if r], "queue": args.queue,
            "sizes": {k: int(v) for k, v in (item.split("=") for item in args.sizes.split(",") if item)}}
    before = worker_pids(stack)
    if stack.redis:
        redis_cli(stack, "ACL", "LOG", "RESET")
    # -u: rows print as they finish; runuser: as the app's account, which reads the settings.
    client = sh("docker", "exec", stack.producer, "runuser", "-u", user, "--", args.python, "-u", CLIENT_ON_HOST,
                json.dumps(spec), check=False)
    rows = [json.loads(line) for line in client.stdout.splitlines() if line.startswith("{")]
    if client.returncode != 0:
        rows.append({"row": "(client)", "status": "FAIL", "seconds": 0,
                     "detail": (client.stderr.strip().splitlines() or ["exited " + str(client.returncode)])[-1]})
    restarted = sorted(unit for unit, pid in worker_pids(stack).items() if before.get(unit) != pid)
    for row in rows:
        if row["row"] == "control-shutdown" and restarted and row["status"] == "ok":
            row.update(status="FAIL", detail=f"workers restarted during the suite: {restarted}")
    # Not the Redis exporter's refused SLOWLOG GET: by design, its ACL user reads no other client's
    # commands (docs/monitoring.md, "The redis exporter's ACL user"; the user's default name is
    # roles/celery_stack's).
    exporter = stack.stack_vars.get("celery_stack_redis_exporter_user", "celery-stack-exporter")
    by_design = {(exporter, "slowlog|get")}
    denials = ([d for d in acl_denials(stack) if (d["username"], d["object"]) not in by_design]
               if stack.redis else [])
    return rows, restarted, denials


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--inventory", required=True)
    parser.add_argument("--rows", default="", help="comma-separated rows (default: all)")
    parser.add_argument("--sizes", default="", help="e.g. group=200,chord=20,chord_large=1000,priority_backlog=200")
    parser.add_argument("--queue", default="cpu", help="a routed queue with a worker of each pool")
    parser.add_argument("--result-backend", choices=["inventory", "rpc"], default="inventory")
    parser.add_argument("--python", default="/opt/celery-stack/venv/bin/python")
    parser.add_argument("--json", help="also write the rows to this file")
    return parser.parse_args()


def main():
    args = parse_args()
    stack = Stack(args.inventory)
    if args.result_backend == "rpc":
        site(stack, {"celery_stack_result_backend": "rpc"})
    try:
        rows, restarted, denials = run_suite(stack, args)
    finally:
        if args.result_backend == "rpc":
            site(stack, {})
    backend = rows[0].get("backend", "?") if rows else "?"
    broker = rows[0].get("broker", "?") if rows else "?"
    print(f"\n{stack.inventory}: broker {broker}, results {backend}, sent from {stack.producer}")
    print(table(rows, COLUMNS))
    print(f"worker restarts during the suite: {len(restarted)} {restarted if restarted else ''}")
    print(f"Redis ACL refusals during the suite: {len(denials)} {denials[:5] if denials else ''}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rows": rows, "restarted": restarted, "acl_denials": denials},
                                                      indent=1))
    return 1 if any(row["status"] == "FAIL" for row in rows) or restarted or denials else 0


if __name__ == "__main__":
    sys.exit(main())
