"""The three-node RabbitMQ cluster of scenario `cluster`, checked by behaviour.

- every node reports the same three running nodes and runs the same RabbitMQ version;
- the routed Celery queues are quorum queues with a member on every node;
- with one broker node stopped, tasks queued before the stop and tasks sent during it all
  complete (results read back through Redis), and the node rejoins when started again;
- the routing table's placement: queue cpu runs on group celery_cpu_workers (worker1) only;
- an inventory value wins over a role's stack default (celery_worker_beat_host).

The failover test drives several hosts at once (a broker, the worker hosts), so it runs once,
from the first worker host, instead of once per host.
"""

import json
import pathlib
import sys
import time

import pytest

# The scenarios' shared test helpers (molecule/shared/tests/stack_hosts.py).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "tests"))
from stack_hosts import VENV_PYTHON, group_hosts, inventory_host  # noqa: E402

BROKERS = group_hosts("rabbitmq")
WORKERS = group_hosts("celery_workers")
VHOST = "celery"

testinfra_hosts = [f"ansible://{name}" for name in BROKERS]


def _cluster_status(host):
    return json.loads(host.check_output("rabbitmqctl -q cluster_status --formatter json"))


def _node_name(host):
    return "rabbit@" + host.check_output("hostname -s")


EXPECTED_NODES = sorted(_node_name(inventory_host(name)) for name in BROKERS)


def test_three_brokers_in_the_inventory():
    assert len(BROKERS) == 3


def test_cluster_runs_every_node(host):
    status = _cluster_status(host)
    assert sorted(status["running_nodes"]) == EXPECTED_NODES
    assert sorted(status["disk_nodes"]) == EXPECTED_NODES


def test_every_node_runs_one_rabbitmq_version():
    versions = {name: inventory_host(name).check_output("rabbitmqctl -q version") for name in BROKERS}
    print("\nRabbitMQ versions:", versions)
    assert len(set(versions.values())) == 1, versions


def test_routed_queues_are_replicated_quorum_queues(host):
    queues = json.loads(
        host.check_output("rabbitmqctl -q list_queues -p %s name type members --formatter json", VHOST)
    )
    routed = {q["name"]: q for q in queues if q["name"] in ("io", "cpu")}
    assert set(routed) == {"io", "cpu"}, queues
    for queue in routed.values():
        assert queue["type"] == "quorum", queue
        assert sorted(queue["members"]) == EXPECTED_NODES, queue


# Sends run_add to a queue (send) or waits for results (collect), with the stack's own app and
# configuration (broker URL list with every node, result backend through the Redis ACL user).
CLIENT = r"""
import json, sys
from celery_stack_app import app
mode, arg = sys.argv[1], json.loads(sys.argv[2])
if mode == "send":
    print(json.dumps([
        {"id": app.send_task("celery_stack_demo.tasks.run_add", args=[i, i], queue=q).id, "n": i, "queue": q}
        for q, first, count in arg for i in range(first, first + count)]))
else:
    out = []
    for sent in arg:
        value = app.AsyncResult(sent["id"]).get(timeout=300)
        out.append({**sent, "result": value["result"], "ran_on": value["hostname"], "from": value["queue"]})
    print(json.dumps(out))
"""


def _client(host, mode, arg):
    return json.loads(host.check_output("%s -c %s %s %s", VENV_PYTHON, CLIENT, mode, json.dumps(arg)))


def _workers(action):
    for name in WORKERS:
        inventory_host(name).check_output("systemctl %s celery-workers.target", action)


def test_tasks_survive_a_stopped_broker_node():
    """Queued tasks are not lost and new ones complete while one broker node is down; the node
    rejoins when started again. The stopped node is the first of the clients' URL list, so
    every client has to fail over."""
    client, broker = inventory_host(WORKERS[0]), inventory_host(BROKERS[0])
    batch = 20
    _workers("stop")
    try:
        queued = _client(client, "send", [["io", 0, batch], ["cpu", 0, batch]])
        broker.check_output("systemctl stop rabbitmq-server.service")
        try:
            _workers("start")
            during = _client(client, "send", [["io", batch, batch], ["cpu", batch, batch]])
            results = _client(client, "collect", queued + during)
        finally:
            broker.check_output("systemctl start rabbitmq-server.service")
    finally:
        _workers("start")

    assert len(results) == 4 * batch
    assert len({r["id"] for r in results}) == 4 * batch
    for r in results:
        assert r["result"] == 2 * r["n"], r
        assert r["from"] == r["queue"], r
    ran_on = sorted({r["ran_on"] for r in results})
    print(f"\n{len(results)} tasks completed with {BROKERS[0]} stopped, on {ran_on}")

    # Started again, the node is back in the cluster (it waits for its peers while it boots).
    status = {}
    for _ in range(60):
        status = _cluster_status(broker)
        if sorted(status.get("running_nodes", [])) == EXPECTED_NODES:
            break
        time.sleep(5)
    assert sorted(status["running_nodes"]) == EXPECTED_NODES
    for name in BROKERS:
        assert sorted(_cluster_status(inventory_host(name))["running_nodes"]) == EXPECTED_NODES


def _worker_units(host):
    out = host.check_output("systemctl list-units --all --plain --no-legend 'celery-worker@*' | awk '{print $1}'")
    return sorted(out.split())


def test_the_cpu_queue_runs_on_its_placed_host_only():
    """celery_stack_queues places cpu on group celery_cpu_workers, which holds worker1 only: worker2
    runs io's workers and none of cpu's, and cpu tasks sent from worker2 run on worker1."""
    placed, other = (inventory_host(name) for name in WORKERS)
    assert _worker_units(placed) == ["celery-worker@cpu-prefork.service", "celery-worker@cpu-threads.service",
                                     "celery-worker@io-prefork.service", "celery-worker@io-threads.service"]
    assert _worker_units(other) == ["celery-worker@io-prefork.service", "celery-worker@io-threads.service"]
    assert not other.file("/etc/celery-stack/workers/cpu-prefork.env").exists
    results = _client(other, "collect", _client(other, "send", [["cpu", 0, 8]]))
    assert [r["result"] for r in results] == [2 * n for n in range(8)]
    assert {r["ran_on"].split("@", 1)[1] for r in results} == {placed.check_output("hostname")}, results


def test_an_inventory_value_wins_over_the_stack_default():
    """inventories/local/group_vars/all/celery_worker.yml sets celery_worker_beat_host to the LAST
    worker host; the role's default is the first. (With the stack wiring in the playbooks'
    group_vars/all, this inventory value was silently ignored.)"""
    first, last = (inventory_host(name) for name in WORKERS)
    assert last.service("celery-beat.service").is_running
    assert not first.file("/etc/systemd/system/celery-beat.service").exists


@pytest.fixture(autouse=True, scope="module")
def _brokers_running():
    """Whatever happened before, start every broker: a test that stopped one restores it."""
    yield
    for name in BROKERS:
        inventory_host(name).run("systemctl start rabbitmq-server.service")
