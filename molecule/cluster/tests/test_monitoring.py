"""Monitoring (celery_stack_monitoring): Flower on the hosts of group celery_flower, and the depth
of the routed queues on RabbitMQ's Prometheus endpoint, checked by behaviour from ANOTHER host,
the producer (group celery_producers), as a browser, an operator's tunnel or Prometheus would
reach them:

- Flower runs as its own user; its basic-auth secret is in none of the unit, the process command
  line (ps), the journal or a file other users can read;
- the ops users (celery_flower_users) see every worker instance of every worker host with its
  routed queue, the tasks the producer sends (SUCCESS), and task outcomes on /metrics;
- refused with 401: anonymous clients on the pages, the API and /metrics (Flower 2 serves
  /metrics to anyone: the role's launcher closes it), the application's and the producers'
  broker credentials, a wrong password; read-only: Flower's control API answers 403;
- queue depth: a burst of slow I/O tasks shows on RabbitMQ's /metrics/detailed as messages ready
  in the io queue, and drains back to 0; Flower counts every one of them as succeeded.

Flower must listen where the producer host reaches it (inventories/local: celery_flower_address
0.0.0.0). Runs under Molecule (scenario cluster) or against the local stack, with any inventory
that has the groups:
  pytest -p no:cacheprovider -v --hosts='ansible://all' --ansible-inventory=inventories/local \\
    --connection=ansible molecule/cluster/tests/test_monitoring.py
"""

import json
import pathlib
import re
import sys
import time
import uuid

import pytest
import testinfra

# The scenarios' shared test helpers (molecule/shared/tests/stack_hosts.py).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "tests"))
from stack_hosts import INVENTORY, TLS_CA, VENV_PYTHON, poll  # noqa: E402

# Under Molecule: the Flower hosts; with --hosts: every host, the others skip.
testinfra_hosts = ["ansible://celery_flower"] if INVENTORY else []

CONFIG_DIR = "/etc/celery-stack"
FLOWER_UNIT = "celery-flower.service"
FLOWER_USER = "celery-flower"
FLOWER_AUTH_FILE = f"{CONFIG_DIR}/flower.env"
PROBE_DIR = "/var/lib/celery-stack"  # where crawl_probe logs its completions on the workers
BURST, BURST_SECONDS = 300, 2


# Runs on the producer host: every request of argv[1] (url, method, auth [user, password]),
# answered with status and body.
HTTP = r"""
import base64, json, ssl, sys, urllib.error, urllib.request
# https: the server's certificate checked against the deployment's CA bundle, and its name.
context = ssl.create_default_context(cafile=sys.argv[2]) if len(sys.argv) > 2 else None
out = []
for spec in json.loads(sys.argv[1]):
    method = spec.get("method", "GET")
    request = urllib.request.Request(spec["url"], method=method, data=b"" if method == "POST" else None)
    if spec.get("auth"):
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(spec["auth"]).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as answer:
            out.append({"status": answer.status, "body": answer.read().decode()})
    except urllib.error.HTTPError as error:
        out.append({"status": error.code, "body": error.read().decode()})
print(json.dumps(out))
"""

# Runs on the producer host as the web app's account, with the deployment's settings:
# `send NAME ARGS_LIST_JSON` sends one task per args list and prints the ids; `collect IDS_JSON
# TIMEOUT` waits for their results.
CLIENT = r"""
import json, sys
from celery_stack_app import app
if sys.argv[1] == "send":
    print(json.dumps([app.send_task(sys.argv[2], args=args).id for args in json.loads(sys.argv[3])]))
else:
    print(json.dumps([app.AsyncResult(i).get(timeout=float(sys.argv[3])) for i in json.loads(sys.argv[2])]))
"""


class Stack:
    """The deployment as the inventory describes it, and the hosts to reach it from."""

    def __init__(self, host):
        self.runner = host.backend.ansible_runner
        self.inventory = host.backend.ansible_inventory
        self.name = host.backend.host
        self.flower_host = host
        self.vars = self.runner.get_variables(self.name)
        self.workers = self.runner.get_hosts("celery_workers")
        self.producers = self.runner.get_hosts("celery_producers")
        self.brokers = self.runner.get_hosts("rabbitmq")
        assert self.producers, "no host in the group celery_producers to look at Flower from"
        self.producer_name = self.producers[0]
        self.producer = self.host(self.producer_name)
        self.producer_vars = self.runner.get_variables(self.producer_name)
        # celery_stack_tls (on for this multi-host inventory): Flower and RabbitMQ's Prometheus
        # endpoint answer over HTTPS with the hosts' certificates; the clients check them
        # against the CA bundle every host has.
        self.tls = self.producer.file(TLS_CA).exists
        self.scheme = "https" if self.tls else "http"
        self.base = f"{self.scheme}://{self.address(self.name)}:{self.vars.get('celery_flower_port', 5555)}"
        self.users = [(u["name"], u["password"]) for u in self.vars["celery_flower_users"]]

    def host(self, name):
        return testinfra.get_host(f"ansible://{name}", ansible_inventory=self.inventory)

    def address(self, name):
        return self.runner.get_variables(name).get("celery_stack_address", name)

    def http(self, *specs):
        """[(path or url, auth or None, method)] -> [{status, body}], requested from the producer."""
        requests = [{"url": path if path.startswith("http") else self.base + path, "auth": auth, "method": method}
                    for path, auth, method in specs]
        if self.tls:
            return json.loads(self.producer.check_output("python3 -c %s %s %s", HTTP, json.dumps(requests), TLS_CA))
        return json.loads(self.producer.check_output("python3 -c %s %s", HTTP, json.dumps(requests)))

    def get(self, path, auth=None):
        return self.http((path, auth, "GET"))[0]

    def as_app(self, *args):
        """CLIENT on the producer host, as the web app's own account."""
        user = self.producer_vars.get("celery_app_user", "web")
        cmd = "runuser -u %s -- %s -c %s" + " %s" * len(args)
        return json.loads(self.producer.check_output(cmd, user, VENV_PYTHON, CLIENT, *args))


@pytest.fixture(scope="module")
def stack(host):
    if host.backend.NAME != "ansible" or "celery_flower" not in host.ansible.get_variables().get("group_names", []):
        pytest.skip("not a Flower host (group celery_flower)")
    return Stack(host)


@pytest.fixture(scope="module")
def expected_workers(stack):
    """Every worker instance of every worker host, as Flower names them (<queue>-<pool>@<host>),
    with its queue, from what the celery_worker role generated on each host."""
    expected = {}
    for name in stack.workers:
        worker = stack.host(name)
        node = worker.check_output("hostname")
        for instance in json.loads(worker.check_output("cat %s/workers.json", CONFIG_DIR)):
            expected[f"{instance['instance']}@{node}"] = instance
    assert expected
    return expected


@pytest.fixture(scope="module")
def routed_queues(stack):
    """The routing table's queues, as deployed."""
    data = json.loads(stack.host(stack.workers[0]).check_output("cat %s/python/celery_stack_config.json", CONFIG_DIR))
    return sorted(entry["name"] for entry in data["table"])


def _secrets(stack):
    """Every password Flower's host must not show: the ops users' and the broker users'."""
    values = [password for _, password in stack.users]
    values += [stack.vars.get(v) for v in ("celery_stack_broker_password", "celery_stack_producer_password")]
    return [value for value in values if value]


def _metric(text, name, **labels):
    """Sum of the samples of a Prometheus metric whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2)))
        if all(have.get(key) == value for key, value in labels.items()):
            total += float(match.group(3))
    return total


def _cpu_seconds(host):
    """CPU time (user + system) of Flower's process so far."""
    pid = host.check_output("systemctl show -p MainPID --value %s", FLOWER_UNIT)
    fields = host.file(f"/proc/{pid}/stat").content_string.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / int(host.check_output("getconf CLK_TCK"))



def test_flower_runs_as_its_own_user(host, stack):
    service = host.service(FLOWER_UNIT)
    assert service.is_running and service.is_enabled
    pid = int(host.check_output("systemctl show -p MainPID --value %s", FLOWER_UNIT))
    assert host.process.get(pid=pid).user == FLOWER_USER
    assert host.user(FLOWER_USER).shell == "/usr/sbin/nologin"


def test_the_basic_auth_secret_is_nowhere_to_be_seen(host, stack):
    """Not in the unit, the command line of any process (ps), the unit's environment, the
    journal; the EnvironmentFile is readable by root and Flower's group only."""
    secrets = _secrets(stack)
    pid = host.check_output("systemctl show -p MainPID --value %s", FLOWER_UNIT)
    shown = {
        "unit": host.check_output("systemctl cat %s", FLOWER_UNIT),
        "ps": host.check_output("ps -eo user,args --no-headers"),
        "cmdline": host.file(f"/proc/{pid}/cmdline").content.replace(b"\0", b" ").decode(),
        "Environment=": host.check_output("systemctl show -p Environment %s", FLOWER_UNIT),
        "journal": host.check_output("journalctl -u %s --no-pager -o cat", FLOWER_UNIT),
    }
    assert "--address=" in shown["cmdline"], shown["cmdline"]  # the process looked at is Flower
    for where, text in shown.items():
        assert not [secret for secret in secrets if secret in text], f"a password shows in the {where}"

    auth = host.file(FLOWER_AUTH_FILE)
    group = stack.vars.get("celery_flower_group", "celery-flower")
    assert (auth.user, auth.group) == ("root", group) and auth.mode & 0o007 == 0, oct(auth.mode)
    # ... and holds what the checks above look for (read here as root).
    assert all(f"{name}:{password}" in auth.content_string for name, password in stack.users)
    app_user = stack.vars.get("celery_app_user", "celery")
    for user in ("nobody", app_user):  # nor do the workers read who may watch them
        assert host.run("runuser -u %s -- cat %s", user, FLOWER_AUTH_FILE).rc != 0, user


def test_anonymous_clients_are_refused(stack):
    paths = ["/", "/workers", "/tasks", "/api/workers", "/api/tasks", "/metrics"]
    answers = stack.http(*[(path, None, "GET") for path in paths])
    assert {path: a["status"] for path, a in zip(paths, answers)} == dict.fromkeys(paths, 401)
    # The one open page says OK and nothing else.
    health = stack.get("/healthcheck")
    assert (health["status"], health["body"]) == (200, "OK")


def test_only_the_ops_users_get_in(stack):
    ops_name, ops_password = stack.users[0]
    refused = {
        "the application's broker user": (stack.vars.get("celery_stack_broker_user", "celery"),
                                           stack.vars["celery_stack_broker_password"]),
        "the producers' broker user": (stack.vars.get("celery_stack_producer_user", "celery-producer"),
                                       stack.vars["celery_stack_producer_password"]),
        "an ops user with a wrong password": (ops_name, ops_password + "-wrong"),
        "an ops user's password with another name": ("admin", ops_password),
    }
    answers = stack.http(*[("/api/workers", list(auth), "GET") for auth in refused.values()],
                         *[(path, list(user), "GET") for user in stack.users for path in ("/api/workers", "/metrics")])
    assert {who: a["status"] for who, a in zip(refused, answers)} == dict.fromkeys(refused, 401)
    assert [a["status"] for a in answers[len(refused):]] == [200] * 2 * len(stack.users)


def test_every_worker_is_listed_with_its_routed_queue(stack, expected_workers, routed_queues):
    ops = list(stack.users[0])

    def listed():
        answer = stack.get("/api/workers?refresh=1", ops)
        assert answer["status"] == 200, answer
        workers = json.loads(answer["body"])
        return workers if set(expected_workers) <= set(workers) else None

    workers = poll(listed, 90, 3) or json.loads(stack.get("/api/workers?refresh=1", ops)["body"])
    assert set(expected_workers) <= set(workers), sorted(workers)
    consumed = set()
    for name, instance in expected_workers.items():
        queues = {queue["name"] for queue in workers[name].get("active_queues") or []}
        assert instance["queue"] in queues, (name, queues)
        consumed |= queues & set(routed_queues)
    assert sorted(consumed) == routed_queues
    print(f"\nFlower lists {len(expected_workers)} worker instances consuming {sorted(consumed)}")


def test_tasks_sent_by_the_producer_show_up_in_flower(stack, expected_workers):
    ops = list(stack.users[0])
    ids = stack.as_app("send", "celery_stack_demo.tasks.run_add", json.dumps([[1000 + i, i] for i in range(5)]))
    results = stack.as_app("collect", json.dumps(ids), "120")
    assert [r["result"] for r in results] == [1000 + 2 * i for i in range(5)]

    def seen():
        tasks = json.loads(stack.get("/api/tasks", ops)["body"])
        return tasks if all(tasks.get(i, {}).get("state") == "SUCCESS" for i in ids) else None

    tasks = poll(seen, 60, 2) or json.loads(stack.get("/api/tasks", ops)["body"])
    for task_id in ids:
        task = tasks.get(task_id, {})
        assert task.get("state") == "SUCCESS", (task_id, task)
        assert task["name"] == "celery_stack_demo.tasks.run_add"
        assert task["worker"] in expected_workers, task["worker"]

    metrics = stack.get("/metrics", ops)
    assert metrics["status"] == 200
    succeeded = _metric(metrics["body"], "flower_events_total", task="celery_stack_demo.tasks.run_add",
                        type="task-succeeded")
    assert succeeded >= len(ids), succeeded
    assert _metric(metrics["body"], "flower_worker_online") >= len(expected_workers)


# Celery's event dispatcher DECLARES the celeryev exchange before it publishes an event
# (celery/events/dispatcher.py: declare=[exchange]): the producers' RabbitMQ user may configure
# that exchange only (producer_permissions). Refused, the dispatcher swallowed the error and kept
# the event in an in-memory buffer that nothing flushed (one per task sent, for the life of the
# web process), and Flower showed the producers' tasks from `received` on.
def test_the_producers_task_sent_events_reach_flower(stack):
    ops = list(stack.users[0])
    ids = stack.as_app("send", "celery_stack_demo.tasks.run_add", json.dumps([[7, 7]]))
    stack.as_app("collect", json.dumps(ids), "120")

    def sent():
        answer = stack.get(f"/api/task/info/{ids[0]}", ops)
        return answer["status"] == 200 and json.loads(answer["body"]).get("sent")

    assert poll(sent, 20, 2), "Flower has no task-sent event of the producer's task"


def test_flower_is_read_only(stack):
    """Its control API refuses even the ops users (a worker that is not there: if the API were
    open, the answer would be 404, and no real worker is ever at risk)."""
    if stack.vars.get("celery_flower_read_only") is False:
        pytest.skip("celery_flower_read_only is false in this inventory")
    ops = list(stack.users[0])
    answers = stack.http(("/api/worker/shutdown/nobody@nowhere", ops, "POST"),
                         (f"/api/task/revoke/{uuid.uuid4()}", ops, "POST"))
    assert [a["status"] for a in answers] == [403, 403], answers


def test_queue_depth_of_a_burst_on_rabbitmq(stack, expected_workers):
    """RabbitMQ's own Prometheus endpoint shows the io queue filling with a burst of slow tasks
    and draining back to 0; every task succeeds and Flower counts them all."""
    ops = list(stack.users[0])
    # The endpoint is node-local (a queue shows where its process or leader runs): every node is
    # asked, the highest value counts.
    port = ("rabbitmq_prometheus_tls_port", 15691) if stack.tls else ("rabbitmq_prometheus_port", 15692)
    depth_urls = [f"{stack.scheme}://{stack.address(broker)}:"
                  f"{stack.runner.get_variables(broker).get(*port)}"
                  f"/metrics/detailed?vhost={stack.vars.get('celery_stack_broker_vhost', 'celery')}"
                  "&family=queue_coarse_metrics" for broker in stack.brokers]
    io_slots = sum(w["concurrency"] for w in expected_workers.values() if w["queue"] == "io")
    threshold = BURST // 3
    assert BURST - io_slots > threshold, "the io workers would take the whole burst at once"

    def ready():
        answers = stack.http(*[(url, None, "GET") for url in depth_urls])
        assert [a["status"] for a in answers] == [200] * len(answers), answers
        return max(_metric(a["body"], "rabbitmq_detailed_queue_messages_ready", queue="io") for a in answers)

    def succeeded():
        return _metric(stack.get("/metrics", ops)["body"], "flower_events_total",
                       task="celery_stack_demo.tasks.crawl_probe", type="task-succeeded")

    assert poll(lambda: ready() == 0, 120), "the io queue is not empty before the burst"
    before = succeeded()
    flower = stack.flower_host
    flower_cpu = _cpu_seconds(flower)
    run = f"monitoring-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    ids = stack.as_app("send", "celery_stack_demo.tasks.crawl_probe",
                       json.dumps([[run, i, BURST_SECONDS] for i in range(BURST)]))
    try:
        # RabbitMQ refreshes these metrics every few seconds (collect_statistics_interval).
        peak = poll(lambda: (lambda n: n if n > threshold else 0)(ready()), 60)
        assert peak > threshold, f"the io queue never held more than {threshold} ready messages"
        risen = time.monotonic() - started
        assert poll(lambda: ready() == 0, 600), "the io queue did not drain"
        drained = time.monotonic() - started
        results = stack.as_app("collect", json.dumps(ids), "300")
    finally:
        for name in stack.workers:
            stack.host(name).run("rm -f %s/probe-%s.log", PROBE_DIR, run)
    assert sorted(r["index"] for r in results) == list(range(BURST))
    poll(lambda: succeeded() - before >= BURST, 60)
    counted = succeeded() - before
    assert counted >= BURST, f"Flower counted {counted:.0f} of {BURST} crawl_probe successes"

    # What Flower costs, during and after the burst (printed with -s; the figures in docs/monitoring.md).
    elapsed = time.monotonic() - started
    shown = dict(line.split("=", 1) for line in flower.check_output(
        "systemctl show -p MainPID -p MemoryCurrent %s", FLOWER_UNIT).splitlines())
    rss_kib = int(flower.check_output("ps -o rss= -p %s", shown["MainPID"]))
    burst_cpu = _cpu_seconds(flower) - flower_cpu
    print(f"\nio queue: {peak:.0f} ready {risen:.0f} s after sending {BURST} x {BURST_SECONDS} s tasks "
          f"({io_slots} io slots), empty at {drained:.0f} s; Flower counted {counted:.0f} successes. "
          f"Flower: RSS {rss_kib / 1024:.1f} MiB, cgroup MemoryCurrent {int(shown['MemoryCurrent']) / 2**20:.1f} MiB, "
          f"CPU {burst_cpu:.1f} s over the {elapsed:.0f} s of the burst ({100 * burst_cpu / elapsed:.1f} %)")
