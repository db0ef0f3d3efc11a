"""Someone is told (issue 23): Prometheus and Alertmanager on the monitoring host (group
celery_monitoring, roles/celery_monitoring) scrape every target over TLS, evaluate the bundle's
rules, and what fires reaches the receiver: the webhook (molecule/shared/webhook.py, started by
molecule/shared/prepare.yml) on the monitoring host, which writes each delivery to RECEIVED.

- every scrape target answers (the broker nodes, their per-queue detail, Flower, the exporters);
- the rules are loaded and evaluate without error;
- the original note's failure: with every io worker stopped while tasks are sent, the io queue
  holds ready tasks with no consumer, and CeleryQueueWithoutConsumer reaches the receiver within
  its `for:` window (inventories/local: 30 s, plus a scrape, an evaluation and Alertmanager's
  group_wait); started again, the workers run the tasks and the alert is resolved, to the
  receiver too;
- a broker memory alarm (a lowered watermark on one node) reaches the receiver as
  RabbitMQMemoryAlarm, and is resolved once the watermark is back.

Each test prints how long the alert took to reach the receiver. The waits are deadlines for an
alert that must come, not speed figures.
"""

import json
import pathlib
import re
import sys
import time
import uuid

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "tests"))
from stack_hosts import INVENTORY, VENV_PYTHON, group_hosts, inventory_host, poll  # noqa: E402

testinfra_hosts = ["ansible://celery_monitoring"] if INVENTORY else []

RECEIVED = "/var/tmp/alerts.jsonl"
IO_UNITS = ["celery-worker@io-threads.service", "celery-worker@io-prefork.service"]

# Runs on the monitoring host: GET argv[1] and print the body.
GET = r"""
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())
"""

# Runs on the producer host as the web app's account: `send NAME ARGS_LIST_JSON` prints the
# ids, `collect IDS_JSON TIMEOUT` waits for their results.
CLIENT = r"""
import json, sys
from celery_stack_app import app
if sys.argv[1] == "send":
    print(json.dumps([app.send_task(sys.argv[2], args=args).id for args in json.loads(sys.argv[3])]))
else:
    print(json.dumps([app.AsyncResult(i).get(timeout=float(sys.argv[3])) for i in json.loads(sys.argv[2])]))
"""


@pytest.fixture(scope="module")
def monitor(host):
    if "celery_monitoring" not in host.ansible.get_variables().get("group_names", []):
        pytest.skip("not a monitoring host (group celery_monitoring)")
    return host


def _api(host, path):
    port = host.ansible.get_variables().get("celery_monitoring_prometheus_port", 9090)
    return json.loads(host.check_output("python3 -c %s %s", GET, f"http://127.0.0.1:{port}/api/v1/{path}"))["data"]



def _deliveries(host, since, alertname, status, **labels):
    """The alerts named `alertname` with `status` (firing, resolved) and these labels that reached
    the receiver after `since` (epoch seconds): [(received, alert)]."""
    text = host.run("cat %s", RECEIVED).stdout
    found = []
    for line in filter(None, text.splitlines()):
        delivery = json.loads(line)
        if delivery["received"] < since:
            continue
        for alert in delivery["body"]["alerts"]:
            if (alert["labels"].get("alertname") == alertname and alert["status"] == status
                    and all(alert["labels"].get(k) == v for k, v in labels.items())):
                found.append((delivery["received"], alert))
    return found


def _as_app(*args):
    producer = group_hosts("celery_producers")[0]
    user = inventory_host(producer).ansible.get_variables().get("celery_app_user", "web")
    cmd = "runuser -u %s -- %s -c %s" + " %s" * len(args)
    return json.loads(inventory_host(producer).check_output(cmd, user, VENV_PYTHON, CLIENT, *args))


def test_every_target_answers(monitor):
    def active():
        return _api(monitor, "targets?state=active")["activeTargets"]

    def all_up():
        targets = active()
        return targets if all(t["health"] == "up" for t in targets) else None

    targets = poll(all_up, 90) or active()
    assert [(t["labels"], t["lastError"]) for t in targets if t["health"] != "up"] == []
    jobs = {}
    for target in targets:
        jobs.setdefault(target["labels"]["job"], set()).add(target["labels"]["instance"])
    brokers = set(group_hosts("rabbitmq"))
    assert jobs["rabbitmq"] == brokers and jobs["rabbitmq-queues"] == brokers
    assert jobs["flower"] == set(group_hosts("celery_flower"))
    if "node" in jobs:
        stack = {h for g in ("rabbitmq", "redis", "celery_workers", "celery_producers", "celery_monitoring")
                 for h in group_hosts(g)}
        assert jobs["node"] == stack and jobs["redis"] == set(group_hosts("redis"))
    print(f"\n{len(targets)} targets up: " + ", ".join(f"{j} {len(i)}" for j, i in sorted(jobs.items())))


def test_the_rules_are_loaded_and_evaluate(monitor):
    def rules():
        groups = [g for g in _api(monitor, "rules")["groups"] if g["name"] == "celery-stack"]
        evaluated = groups and all(r.get("lastEvaluation", "").startswith("20") for r in groups[0]["rules"])
        return groups[0]["rules"] if evaluated else None

    loaded = poll(rules, 60)
    assert loaded, "the group celery-stack was not loaded, or not evaluated"
    assert [r["name"] for r in loaded if r["health"] != "ok"] == []
    assert {"CeleryQueueWithoutConsumer", "CeleryWorkerOffline", "RabbitMQMemoryAlarm", "RedisDown",
            "CertificateExpiresSoon"} <= {r["name"] for r in loaded}


def test_a_queue_without_consumer_reaches_the_receiver_and_resolves(monitor):
    """The original note's failure, as an operator would meet it: every io worker gone while the
    web app keeps sending."""
    workers = [inventory_host(h) for h in group_hosts("celery_workers")]
    started = time.time()
    try:
        for worker in workers:
            worker.check_output("systemctl stop %s %s", *IO_UNITS)
        run = uuid.uuid4().hex[:8]
        ids = _as_app("send", "celery_stack_demo.tasks.crawl_probe", json.dumps([[run, i, 0] for i in range(20)]))
        fired = poll(lambda: _deliveries(monitor, started, "CeleryQueueWithoutConsumer", "firing", queue="io"), 180)
        assert fired, "CeleryQueueWithoutConsumer for io never reached the receiver"
        print(f"\nCeleryQueueWithoutConsumer (io) reached the receiver {fired[0][0] - started:.0f} s after the "
              f"io workers stopped: {fired[0][1]['annotations']['description']}")
    finally:
        for worker in workers:
            worker.run("systemctl start %s %s", *IO_UNITS)
    back = time.time()
    assert len(_as_app("collect", json.dumps(ids), "120")) == len(ids)
    resolved = poll(lambda: _deliveries(monitor, back, "CeleryQueueWithoutConsumer", "resolved", queue="io"), 120)
    assert resolved, "CeleryQueueWithoutConsumer for io was never resolved at the receiver"
    print(f"resolved at the receiver {resolved[0][0] - back:.0f} s after the workers started; the 20 tasks ran")


def test_a_broker_memory_alarm_reaches_the_receiver(monitor):
    """A lowered watermark on one node raises the memory alarm, which blocks every publisher of the
    cluster; the watermark of the node's configuration puts it back."""
    name = group_hosts("rabbitmq")[-1]
    node = inventory_host(name)
    configured = re.search(r"^vm_memory_high_watermark\.relative = ([0-9.]+)$",
                           node.file("/etc/rabbitmq/rabbitmq.conf").content_string, re.M).group(1)
    started = time.time()
    try:
        node.check_output("rabbitmqctl -q set_vm_memory_high_watermark 0.0001")
        fired = poll(lambda: _deliveries(monitor, started, "RabbitMQMemoryAlarm", "firing", instance=name), 120)
        assert fired, f"RabbitMQMemoryAlarm of {name} never reached the receiver"
        print(f"\nRabbitMQMemoryAlarm ({name}) reached the receiver {fired[0][0] - started:.0f} s after the watermark "
              "was lowered")
    finally:
        node.check_output("rabbitmqctl -q set_vm_memory_high_watermark %s", configured)
    back = time.time()
    resolved = poll(lambda: _deliveries(monitor, back, "RabbitMQMemoryAlarm", "resolved", instance=name), 120)
    assert resolved, f"RabbitMQMemoryAlarm of {name} was never resolved at the receiver"
    print(f"resolved {resolved[0][0] - back:.0f} s after the watermark was back at {configured}")
