"""Behaviour of roles/celery_worker on the hosts of group celery_workers.

The expected routing table and workers are read from what the role GENERATED on the host
(celery_stack_config.ROUTING_TABLE in /etc/celery-stack/python, /etc/celery-stack/workers.json), so the
same tests verify any routing table, including a second converge that removed a queue or a pool.
Optionally the scenario sets CELERY_STACK_ABSENT_QUEUES="q1,q2" (queues removed from the table
by that converge) to also assert that nothing of them is left on the host.

Run against a dev container: pytest --hosts=docker://NAME molecule/default/tests/test_celery_worker.py
"""

import fnmatch
import json
import os
import re
import shlex
import time

import pytest

VENV = os.environ.get("CELERY_STACK_VENV", "/opt/celery-stack/venv")
PYTHON = f"{VENV}/bin/python"
CONFIG_DIR = "/etc/celery-stack"
SERVICE_USER = os.environ.get("CELERY_STACK_SERVICE_USER", "celery")
MAX_EXPOSURE = 2.5

DEMO = "celery_stack_demo.tasks"

# Under Molecule: the hosts of group celery_workers (directly: whatever host --hosts names).
testinfra_hosts = ["ansible://celery_workers"] if os.environ.get("MOLECULE_INVENTORY_FILE") else []


def _groups(host):
    """Inventory groups of the host; a host given directly (docker://) is taken as a worker."""
    try:
        return host.ansible.get_variables().get("group_names", [])
    except Exception:  # noqa: BLE001 - not the ansible backend
        return ["celery_workers"]


@pytest.fixture(scope="module")
def deployed(host):
    """The routing table and workers as deployed on this host (from the generated config)."""
    if "celery_workers" not in _groups(host):
        pytest.skip("not a Celery worker host")
    out = host.check_output(
        "%s -c %s",
        PYTHON,
        "import json, celery_stack_config as c; print(json.dumps({'table': c.ROUTING_TABLE, "
        "'default': c.DEFAULT_QUEUE, 'broker': c.BROKER_TYPE}))",
    )
    data = json.loads(out)
    data["workers"] = json.loads(host.file(f"{CONFIG_DIR}/workers.json").content_string)
    data["nodename"] = host.check_output("hostname")
    assert data["workers"], "the generated config lists no worker"
    return data


def _main_pid(host, unit):
    return int(host.check_output("systemctl show -p MainPID --value %s", unit))


def _celery(host, *args):
    """Run `celery` with the stack's app and config on the host (as root) and return stdout."""
    cmd = f"{VENV}/bin/celery -A celery_stack_app " + " ".join(shlex.quote(a) for a in args)
    return host.check_output(cmd)


def test_every_worker_instance_runs_as_configured(host, deployed):
    """Each queue x pool instance is active, enabled, runs as the service user with its pool."""
    assert host.service("celery-workers.target").is_running
    assert host.service("celery-workers.target").is_enabled
    for worker in deployed["workers"]:
        unit = f"celery-worker@{worker['instance']}.service"
        service = host.service(unit)
        assert service.is_running, f"{unit} is not active"
        assert service.is_enabled, f"{unit} is not enabled"
        pid = _main_pid(host, unit)
        assert host.process.get(pid=pid).user == SERVICE_USER
        argv = host.file(f"/proc/{pid}/cmdline").content.split(b"\0")
        argv = [a.decode() for a in argv if a]
        assert argv[argv.index("-Q") + 1] == worker["queue"]
        assert argv[argv.index("-P") + 1] == worker["pool"]
        assert argv[argv.index("-c") + 1] == str(worker["concurrency"])
        assert argv[argv.index("-n") + 1] == f"{worker['instance']}@{deployed['nodename']}"


def test_unit_stops_warmly_and_restarts(host, deployed):
    """Warm shutdown (SIGTERM to the main process only), each instance with its own stop timeout
    above its time limit; readiness and the watchdog through sd_notify from the worker."""
    for worker in deployed["workers"]:
        unit = f"celery-worker@{worker['instance']}.service"
        props = dict(
            line.split("=", 1)
            for line in host.check_output(
                "systemctl show -p Type -p NotifyAccess -p WatchdogUSec -p KillMode -p KillSignal -p Restart "
                "-p TimeoutStopUSec %s", unit
            ).splitlines()
        )
        assert (props["Type"], props["NotifyAccess"]) == ("notify", "main")
        assert props["WatchdogUSec"] != "0"
        assert props["KillMode"] == "mixed"
        assert props["KillSignal"] == "15"
        assert props["Restart"] == "always"
        seconds = sum(int(n) * {"h": 3600, "min": 60, "s": 1}[u]
                      for n, u in re.findall(r"(\d+)(h|min|s)", props["TimeoutStopUSec"]))
        assert seconds == worker["stop_timeout"], unit
        assert seconds > worker["time_limit"], f"{unit}: TimeoutStopSec {seconds} s, time limit {worker['time_limit']} s"


def test_no_orphan_workers(host, deployed):
    """Exactly the table's instances exist: a removed queue or pool leaves no unit behind."""
    expected = {w["instance"] for w in deployed["workers"]}
    loaded = host.check_output(
        "systemctl list-units --all --plain --no-legend 'celery-worker@*' | awk '{print $1}'"
    ).split()
    instances = {re.sub(r"^celery-worker@(.*)\.service$", r"\1", u) for u in loaded}
    # Units stopped and disabled may stay "loaded inactive" until systemd forgets them.
    active = {i for i in instances if host.service(f"celery-worker@{i}.service").is_running}
    assert active == expected
    env_files = set(host.check_output(f"ls {CONFIG_DIR}/workers").split())
    assert env_files == {f"{i}.env" for i in expected}
    wants = host.check_output(
        "ls /etc/systemd/system/celery-workers.target.wants/ 2>/dev/null || true"
    ).split()
    assert {w for w in wants if w.startswith("celery-worker@")} == {
        f"celery-worker@{i}.service" for i in expected
    }
    absent = [q for q in os.environ.get("CELERY_STACK_ABSENT_QUEUES", "").split(",") if q]
    for queue in absent:
        assert queue not in {w["queue"] for w in deployed["workers"]}
        assert not any(i.startswith(f"{queue}-") for i in active), f"queue {queue} still has workers"


def test_workers_consume_only_their_queue(host, deployed):
    """`celery inspect active_queues`: every worker of this host consumes exactly its queue."""
    mine = {f"{w['instance']}@{deployed['nodename']}": w for w in deployed["workers"]}
    replies = {}
    for _ in range(10):  # freshly (re)started workers may not answer the first broadcast
        replies = json.loads(_celery(host, "inspect", "active_queues", "--json", "--timeout", "5"))
        if set(mine) <= set(replies):
            break
        time.sleep(3)
    ours = {node: queues for node, queues in replies.items() if node.endswith("@" + deployed["nodename"])}
    assert set(ours) == set(mine), f"workers answering: {sorted(ours)}"
    for node, queues in ours.items():
        assert [q["name"] for q in queues] == [mine[node]["queue"]], node
    stats = json.loads(_celery(host, "inspect", "stats", "--json", "--timeout", "5"))
    for node, worker in mine.items():
        pool = stats[node]["pool"]
        assert pool["implementation"].startswith(
            {"prefork": "celery.concurrency.prefork", "threads": "celery.concurrency.thread"}[worker["pool"]]
        ), node
        assert pool["max-concurrency"] == worker["concurrency"], node


def _expected_queue(deployed, task_name):
    for entry in deployed["table"]:
        if any(fnmatch.fnmatchcase(task_name, pattern) for pattern in entry["tasks"]):
            return entry["name"]
    return deployed["default"]


CLIENT = r"""
import json, sys
from urllib.parse import urlparse
from celery_stack_app import app

calls = json.loads(sys.argv[1])
sent = [(name, app.send_task(name, args=args)) for name, args in calls]
results = [{"task": name, "id": r.id, "value": r.get(timeout=120)} for name, r in sent]
backend = {"class": type(app.backend).__name__}
if backend["class"] == "RedisBackend":
    client = app.backend.client
    backend["url_user"] = urlparse(app.conf.result_backend).username
    backend["stored"] = [json.loads(client.get(app.backend.get_key_for_task(r["id"])))["status"]
                         for r in results]
conf = {k: app.conf[k] for k in ("task_acks_late", "worker_prefetch_multiplier", "result_expires",
                                 "task_serializer", "task_default_queue")}
print(json.dumps({"results": results, "backend": backend, "conf": conf}))
"""


@pytest.fixture(scope="module")
def page_server(host, deployed):
    """A local HTTP server with one page, for the crawl task; stopped afterwards.

    Bound to 127.0.0.1 when this host runs the only workers; when workers of other hosts share
    the queues (cluster), the crawl may run there, so it listens on all addresses and the URL
    names this host."""
    replies = json.loads(_celery(host, "inspect", "ping", "--json", "--timeout", "5"))
    hosts = {node.partition("@")[2] for node in replies}
    bind, name = ("127.0.0.1", "127.0.0.1") if hosts <= {deployed["nodename"]} else ("0.0.0.0", deployed["nodename"])
    root = host.check_output("mktemp -d /var/tmp/celery-stack-test.XXXXXX")
    host.check_output(
        "printf '%%s' '<html><head><title>celery-stack demo page</title></head><body>hi</body></html>'"
        " > %s/index.html && chmod -R a+rX %s",
        root,
        root,
    )
    port = "18765"
    pid = host.check_output(
        "cd %s && setsid nohup python3 -m http.server %s --bind %s >/dev/null 2>&1 & echo $!", root, port, bind
    )
    for _ in range(50):
        if host.run("python3 -c 'import urllib.request as u; u.urlopen(\"http://127.0.0.1:%s/\")'", port).rc == 0:
            break
        time.sleep(0.2)
    yield f"http://{name}:{port}/index.html"
    host.run("kill %s", pid)
    host.run("rm -rf %s", root)


def test_demo_tasks_end_to_end(host, deployed, page_server):
    """From outside the workers: each demo task goes to its queue, runs on that queue's pool, and
    the result comes back through Redis as the results ACL user."""
    calls = [[f"{DEMO}.run_add", [2, 3]] for _ in range(4)]
    calls += [[f"{DEMO}.cpu_fib", [18]] for _ in range(4)]
    calls += [[f"{DEMO}.crawl_and_store", [page_server]] for _ in range(4)]
    out = json.loads(host.check_output("%s -c %s %s", PYTHON, CLIENT, json.dumps(calls)))
    pools_of = {}
    for w in deployed["workers"]:
        pools_of.setdefault(w["queue"], set()).add(w["pool"])
    main_pids = {
        w["instance"]: _main_pid(host, f"celery-worker@{w['instance']}.service") for w in deployed["workers"]
    }
    for result in out["results"]:
        value, task = result["value"], result["task"]
        queue = _expected_queue(deployed, task)
        instance, _, node = value["hostname"].partition("@")
        local = node == deployed["nodename"]  # in a cluster, another worker host may run it
        assert value["queue"] == queue, f"{task} was delivered from {value['queue']}, expected {queue}"
        assert instance.startswith(queue + "-"), f"{task} ran on {instance}, not a worker of queue {queue}"
        pool = instance[len(queue) + 1:]
        # A worker of this host runs a pool it deploys; another host may run a queue this host
        # does not (placement: celery_stack_queues[].hosts).
        assert pool in (pools_of.get(queue, set()) if local else {"prefork", "threads"}), instance
        if pool == "threads":  # a thread of the worker's own process
            assert value["thread"] != "MainThread"
            assert not local or value["pid"] == main_pids[instance]
        else:  # a child process of the prefork pool
            assert value["thread"] == "MainThread"
            assert not local or value["pid"] != main_pids[instance]
        if task.endswith("run_add"):
            assert value["result"] == 5
        elif task.endswith("cpu_fib"):
            assert value["result"] == 2584
        else:
            assert value["status"] == 200 and value["title"] == "celery-stack demo page"
            if not local:
                continue
            row = host.check_output(
                "python3 -c %s",
                "import sqlite3; print(sqlite3.connect('%s').execute('SELECT url, status, title FROM pages"
                " WHERE id=%d').fetchone())" % (value["db"], value["row_id"]),
            )
            assert "celery-stack demo page" in row and page_server in row
    ran_on = sorted((r["task"].rsplit(".", 1)[1], r["value"]["hostname"]) for r in out["results"])
    print("\ndemo tasks ran on:", sorted(set(ran_on)))
    backend = out["backend"]
    if backend["class"] == "RedisBackend":
        # The results were read back over the backend's own connection, logged in as the URL's
        # user (the default user is off: test_redis.py), so that ACL user stored and read them.
        # (ACL WHOAMI itself is outside the user's least-privilege command set.)
        assert backend["url_user"] and backend["url_user"] != "default"
        assert set(backend["stored"]) == {"SUCCESS"}
    # Layering: the stack's reliability settings win, the app's own settings stay.
    assert out["conf"]["task_acks_late"] is True
    assert out["conf"]["task_default_queue"] == deployed["default"]
    assert out["conf"]["result_expires"] == 3600  # from the demo app's own config


def test_secrets_readable_only_by_root_and_service(host, deployed):
    secrets = host.file(f"{CONFIG_DIR}/celery.env")
    assert secrets.user == "root" and secrets.group == SERVICE_USER and secrets.mode == 0o640
    assert host.run("runuser -u nobody -- cat %s/celery.env", CONFIG_DIR).rc != 0
    assert host.run("runuser -u %s -- cat %s/celery.env", SERVICE_USER, CONFIG_DIR).rc == 0
    # No secret in the command lines of the workers.
    for worker in deployed["workers"]:
        pid = _main_pid(host, f"celery-worker@{worker['instance']}.service")
        assert b"@" not in host.file(f"/proc/{pid}/cmdline").content.replace(
            f"{worker['instance']}@".encode(), b""
        )


def test_worker_unit_security_exposure(host, deployed):
    """systemd-analyze security of the unit with REAL-HOST settings (the main unit file without
    the container drop-in) scores at most 2.5."""
    workdir = host.check_output("mktemp -d /var/tmp/celery-stack-sa.XXXXXX")
    try:
        # Another unit name, so the container drop-in of celery-worker@.service does not apply.
        host.check_output(
            "cp /etc/systemd/system/celery-worker@.service %s/celery-worker-realhost@io.service", workdir
        )
        out = host.check_output(
            "systemd-analyze security --offline=yes --no-pager %s/celery-worker-realhost@io.service 2>&1", workdir
        )
    finally:
        host.run("rm -rf %s", workdir)
    score = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out).group(1))
    print(f"\nsystemd-analyze security (real-host settings) of celery-worker@.service: {score}")
    assert score <= MAX_EXPOSURE, out
    dropin = host.file("/etc/systemd/system/celery-worker@.service.d/container-compat.conf")
    if dropin.exists:  # container hosts: the drop-in switches off only PrivateUsers
        settings = [line for line in dropin.content_string.splitlines() if line and line[0] not in "#["]
        assert settings == ["PrivateUsers=no"]


def test_beat_runs_on_exactly_one_host(host, deployed):
    """celery beat runs on the last worker host only (inventories/local/group_vars/all sets
    celery_worker_beat_host so), and sends the demo app's periodic task."""
    groups = host.ansible.get_variables()["groups"]
    beat = host.service("celery-beat.service")
    if host.ansible.get_variables()["inventory_hostname"] != groups["celery_workers"][-1]:
        assert not host.file("/etc/systemd/system/celery-beat.service").exists
        return
    assert beat.is_running and beat.is_enabled
    pid = _main_pid(host, "celery-beat.service")
    assert host.process.get(pid=pid).user == SERVICE_USER
    sent = ""
    for _ in range(30):  # the heartbeat is due every 15 s
        sent = host.check_output("journalctl -u celery-beat.service --no-pager -o cat | grep -c 'Sending due task heartbeat' || true")
        if int(sent or 0) > 0:
            break
        time.sleep(2)
    assert int(sent or 0) > 0, "celery beat sent no periodic task"
