"""Poison tasks neither loop nor vanish, on the hosts of group celery_workers.

A task that kills its prefork child every time (celery_stack_demo.tasks.cpu_poison: SIGKILL, as
an OOM kill does) runs at most celery_app_task_worker_lost_limit times, then its message is in
the dead-letter queue <queue>.dead-letter and the client reads FAILURE with a message that says
so. Replaying the message (celery_stack_dead_letters) runs it again. The same test runs on
classic queues (default scenario) and quorum queues (cluster scenario, or the default scenario
converged with celery_stack_quorum_queues=true).

The threads workers of the task's queue on this host are stopped while the test runs: a threads
pool has no child to lose, so only the prefork worker must take the task.
"""

import json
import os
import shlex
import time
import uuid

import pytest

VENV = os.environ.get("CELERY_STACK_VENV", "/opt/celery-stack/venv")
PYTHON = f"{VENV}/bin/python"
PROBE_DIR = "/var/lib/celery-stack"
POISON = "celery_stack_demo.tasks.cpu_poison"

testinfra_hosts = ["ansible://celery_workers"] if os.environ.get("MOLECULE_INVENTORY_FILE") else []

SETUP = r"""
import fnmatch, json, celery_stack_config as c
from celery_stack_app import app
name = "%s"
queue = next((e["name"] for e in c.ROUTING_TABLE if any(fnmatch.fnmatchcase(name, p) for p in e["tasks"])),
             c.DEFAULT_QUEUE)
print(json.dumps({"queue": queue, "limit": app.conf.get("celery_stack_task_worker_lost_limit"),
                  "vhost": app.connection_for_write().virtual_host}))
""" % POISON

# Sends one task and waits for its outcome without raising it (FAILURE is the expected one).
CLIENT = r"""
import json, sys
from celery_stack_app import app
r = app.send_task(sys.argv[1], args=json.loads(sys.argv[2]))
try:
    r.get(timeout=float(sys.argv[3]), propagate=False)
except Exception as exc:  # a timeout: the task is still PENDING/STARTED
    print(json.dumps({"id": r.id, "state": r.state, "result": repr(exc)}))
else:
    print(json.dumps({"id": r.id, "state": r.state, "result": f"{type(r.result).__name__}: {r.result}"}))
"""

WAIT = r"""
import json, sys
from celery_stack_app import app
r = app.AsyncResult(sys.argv[1])
r.get(timeout=float(sys.argv[2]), propagate=False)
print(json.dumps({"state": r.state, "result": r.result}))
"""


def _python(host, code, *args):
    return host.check_output(f"{PYTHON} -c {shlex.quote(code)} " + " ".join(shlex.quote(str(a)) for a in args))


def _attempts(host, run):
    log = host.file(f"{PROBE_DIR}/poison-{run}.log")
    return log.content_string.splitlines() if log.exists else []


def _dead_letters(host, queue):
    out = host.check_output(f"{PYTHON} -m celery_stack_dead_letters list {shlex.quote(queue)} --json")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def poison_queue(host):
    """The poison task's queue, with only its prefork workers of this host running."""
    try:
        groups = host.ansible.get_variables().get("group_names", [])
    except Exception:  # noqa: BLE001 - not the ansible backend
        groups = ["celery_workers"]
    if "celery_workers" not in groups:
        pytest.skip("not a Celery worker host")
    setup = json.loads(_python(host, SETUP))
    workers = json.loads(host.file("/etc/celery-stack/workers.json").content_string)
    mine = [w for w in workers if w["queue"] == setup["queue"]]
    if not any(w["pool"] == "prefork" for w in mine):
        pytest.skip(f"no prefork worker of queue {setup['queue']} on this host")
    threads = [f"celery-worker@{w['instance']}.service" for w in mine if w["pool"] != "prefork"]
    for unit in threads:
        host.check_output("systemctl stop %s", unit)
    yield setup
    for unit in threads:
        host.check_output("systemctl start %s", unit)


def test_poison_task_dead_lettered_after_limit(host, poison_queue):
    queue, limit = poison_queue["queue"], poison_queue["limit"] or 3
    run = uuid.uuid4().hex
    started = time.monotonic()
    out = json.loads(_python(host, CLIENT, POISON, json.dumps([run, limit]), 45))
    attempts = _attempts(host, run)
    print(f"\npoison task: {out['state']} after {time.monotonic() - started:.1f} s, {len(attempts)} attempts:"
          f" {out['result']}")
    assert out["state"] == "FAILURE", f"{out}; attempts: {len(attempts)}"
    assert "WorkerLostError" in out["result"] and f"{queue}.dead-letter" in out["result"]
    time.sleep(3)  # no attempt after the verdict
    attempts = _attempts(host, run)
    assert len(attempts) == limit, attempts

    # The message is in the queue's dead-letter queue, as delivered the last time (the death that
    # rejected it is not in it).
    held = [m for m in _dead_letters(host, queue) if m["id"] == out["id"]]
    assert len(held) == 1, held
    assert held[0]["earlier_deaths"] == limit - 1 and held[0]["reason"] == "rejected" and held[0]["task"] == POISON
    if host.exists("rabbitmqctl"):
        listing = json.loads(host.check_output(
            "rabbitmqctl -q list_queues -p %s name messages --formatter json", poison_queue["vhost"]))
        assert {q["name"]: q["messages"] for q in listing}.get(f"{queue}.dead-letter", 0) >= 1, listing

    # Replayed, it runs once more (cpu_poison(run, limit) returns on attempt limit + 1).
    host.check_output(f"{PYTHON} -m celery_stack_dead_letters replay {shlex.quote(queue)} --id {out['id']}")
    replayed = json.loads(_python(host, WAIT, out["id"], 30))
    assert replayed["state"] == "SUCCESS", replayed
    assert replayed["result"]["attempts"] == limit + 1
    assert not [m for m in _dead_letters(host, queue) if m["id"] == out["id"]]
