"""Producer hosts (group celery_producers): a web/app server that sends tasks and runs no worker,
checked by behaviour from that host, as the web app's own account:

- it runs no worker, and the settings and the secrets file are readable by the app's account
  (and root) only;
- every routed task the application sends (`.delay()`, `apply_async`, `send_task` by name, with
  a queue named, with a countdown) runs on its queue's workers on another host, and its result is
  read back on the producer;
- the producers' RabbitMQ user is refused consuming, declaring, another vhost and the
  management API;
- an application that ignores the routing table (a plain Celery app with Celery's default queue
  `celery`) is refused by the broker at once: its task cannot sit PENDING in a queue that no
  worker consumes.
"""

import json
import pathlib
import sys
import time

import pytest

# The scenarios' shared test helpers (molecule/shared/tests/stack_hosts.py).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "tests"))
from stack_hosts import RUNNER, TLS_CA, VENV_PYTHON, group_hosts, inventory_host  # noqa: E402

PRODUCERS = group_hosts("celery_producers")
BROKERS = group_hosts("rabbitmq")
CONFIG_DIR = "/etc/celery-stack"
APP_USER = "web"  # inventories/local/group_vars/celery_producers.yml
VHOST = "celery"

testinfra_hosts = [f"ansible://{name}" for name in PRODUCERS]


def _as_app(host, script, *args):
    """Run a Python script with the venv's python as the web app's account; return its JSON."""
    cmd = "runuser -u %s -- %s -c %s" + " %s" * len(args)
    return json.loads(host.check_output(cmd, APP_USER, VENV_PYTHON, script, *args))


def test_the_inventory_has_a_producer_that_is_not_a_worker():
    assert PRODUCERS and not set(PRODUCERS) & set(group_hosts("celery_workers"))


def test_a_producer_host_runs_no_worker(host):
    units = host.check_output("systemctl list-units --all --plain --no-legend 'celery-*' | awk '{print $1}'")
    assert units.split() == []
    assert not host.file("/etc/systemd/system/celery-worker@.service").exists
    assert not host.file("/etc/systemd/system/celery-beat.service").exists


def test_the_settings_and_secrets_are_the_app_accounts_only(host):
    for path, mode in ((f"{CONFIG_DIR}/celery.env", 0o640), (f"{CONFIG_DIR}/python", 0o750),
                       (f"{CONFIG_DIR}/python/celery_stack_config.json", 0o640)):
        item = host.file(path)
        assert (item.user, item.group, item.mode) == ("root", APP_USER, mode), path
    assert host.run("runuser -u nobody -- cat %s/celery.env", CONFIG_DIR).rc != 0
    assert host.run("runuser -u %s -- cat %s/celery.env", APP_USER, CONFIG_DIR).rc == 0
    # The producers' broker user, not the workers'; every broker node in the URL list.
    url = _as_app(host, "import json, celery_stack_config as c; print(json.dumps(c.settings()['broker_url']))")
    users = {part.split("://", 1)[1].split(":", 1)[0] for part in url.split(";")}
    assert users == {"celery-producer"}
    assert len(url.split(";")) == len(BROKERS)


# The application's own module, as a web process imports it, plus the one documented line.
PRODUCER = r"""
import json, sys
from celery_stack_demo.app import app
import celery_stack_config
celery_stack_config.apply(app)
from celery_stack_demo import tasks

url = sys.argv[1]
sent = [
    ("run_add", ".delay()", tasks.run_add.delay(2, 3)),
    ("cpu_fib", "apply_async", tasks.cpu_fib.apply_async((18,))),
    ("crawl_and_store", ".delay()", tasks.crawl_and_store.delay(url)),
    ("run_add", "send_task by name", app.send_task("celery_stack_demo.tasks.run_add", args=(4, 5))),
    ("run_add", "send_task to a named queue", app.send_task("celery_stack_demo.tasks.run_add", args=(6, 7),
                                                            queue="cpu")),
    ("run_add", "apply_async with a countdown", tasks.run_add.apply_async((1, 1), countdown=3)),
]
print(json.dumps([{"task": task, "how": how, "value": result.get(timeout=180)} for task, how, result in sent]))
"""
EXPECTED = {"run_add": "cpu", "cpu_fib": "cpu", "crawl_and_store": "io"}


@pytest.fixture
def page(host):
    """A page the crawl task fetches, served by the producer host to the worker hosts."""
    root = host.check_output("mktemp -d /var/tmp/celery-stack-page.XXXXXX")
    host.check_output("printf '<html><head><title>from the web host</title></head></html>' > %s/index.html"
                      " && chmod -R a+rX %s", root, root)
    pid = host.check_output("cd %s && setsid nohup python3 -m http.server 18766 >/dev/null 2>&1 & echo $!", root)
    time.sleep(1)
    yield f"http://{host.check_output('hostname')}:18766/index.html"
    host.run("kill %s", pid)
    host.run("rm -rf %s", root)


def test_every_routed_task_runs_on_its_queue_and_pool(host, page):
    results = _as_app(host, PRODUCER, page)
    me = host.check_output("hostname")
    for result in results:
        value, queue = result["value"], EXPECTED[result["task"]]
        instance, _, node = value["hostname"].partition("@")
        # A countdown on quorum queues goes through Celery's delayed-delivery exchanges, which
        # deliver with a routing key of delay bits ending in the queue's name.
        delivered = value["queue"]
        if value["exchange"] == "celery_delayed_delivery":
            delivered = delivered.rsplit(".", 1)[-1]
        assert delivered == queue, result
        assert instance in (f"{queue}-prefork", f"{queue}-threads"), result
        assert node != me, result  # a worker host ran it, the producer runs none
        # the pool in the worker's name is the pool that ran it: a thread, or a prefork child
        assert (value["thread"] != "MainThread") == instance.endswith("-threads"), result
    values = {(r["task"], r["how"]): r["value"] for r in results}
    assert values[("run_add", ".delay()")]["result"] == 5
    assert values[("cpu_fib", "apply_async")]["result"] == 2584
    assert values[("crawl_and_store", ".delay()")]["title"] == "from the web host"
    assert values[("run_add", "send_task by name")]["result"] == 9
    assert values[("run_add", "send_task to a named queue")]["result"] == 13
    assert values[("run_add", "apply_async with a countdown")]["result"] == 2
    print("\nsent from", me, "ran on:", sorted({(r["how"], r["value"]["hostname"]) for r in results}))


# What the producers' user may not do, each tried on its own connection.
REFUSALS = r"""
import json
import amqp
import amqp.exceptions
from kombu import Connection
import celery_stack_config

settings = celery_stack_config.settings()
url = settings["broker_url"].split(";")[0]
# Over TLS when the deployment uses it (celery_stack_tls), as its own clients connect.
use_ssl = settings.get("broker_use_ssl") or False
other_vhost = url.rsplit("/", 1)[0] + "/%2F"
tries = {
    "consume a routed queue": (url, lambda channel: channel.basic_get("io")),
    "declare a queue": (url, lambda channel: channel.queue_declare("celery", durable=True)),
    "declare an exchange": (url, lambda channel: channel.exchange_declare("io", "direct", durable=True)),
    "configure another vhost": (other_vhost, lambda channel: channel.queue_declare("x", durable=True)),
    # Celery's own control mailbox (shutdown, pool_restart, ...): revoke goes to the producers' own
    "declare Celery's control mailbox": (url, lambda channel: channel.exchange_declare("celery.pidbox", "fanout")),
    "publish to Celery's control mailbox": (url, lambda channel: (channel.confirm_select(), channel.basic_publish_confirm(
        amqp.Message(b"{}"), exchange="celery.pidbox"))),
}
out = {}
for name, (target, action) in tries.items():
    try:
        with Connection(target, connect_timeout=10, ssl=use_ssl) as connection:
            action(connection.default_channel)
        out[name] = "allowed"
    except (amqp.exceptions.AccessRefused, amqp.exceptions.NotAllowed) as error:
        out[name] = "refused: " + str(error)
print(json.dumps(out))
"""


def test_the_producer_user_is_refused_everything_but_publishing(host):
    out = _as_app(host, REFUSALS)
    print("\n" + json.dumps(out, indent=1))
    assert all(verdict.startswith("refused") for verdict in out.values()), out
    assert "ACCESS_REFUSED" in out["consume a routed queue"]


# argv: USER PASSWORD [CA]; run on a broker host. Prints the HTTP status and body of /api/whoami,
# over HTTPS checked against CA when the deployment uses TLS (no plain listener then).
WHOAMI = r"""
import base64, json, ssl, sys, urllib.error, urllib.request
ca = sys.argv[3] if len(sys.argv) > 3 else ""
context = ssl.create_default_context(cafile=ca) if ca else None
request = urllib.request.Request(("https://127.0.0.1:15671" if ca else "http://127.0.0.1:15672") + "/api/whoami")
request.add_header("Authorization", "Basic " + base64.b64encode(":".join(sys.argv[1:3]).encode()).decode())
try:
    with urllib.request.urlopen(request, timeout=10, context=context) as answer:
        print(json.dumps({"status": answer.status, "body": answer.read().decode()}))
except urllib.error.HTTPError as error:
    print(json.dumps({"status": error.code, "body": error.read().decode()}))
"""


def test_the_producer_user_has_no_management_access():
    password = RUNNER.get_variables(PRODUCERS[0])["celery_stack_producer_password"]
    broker = inventory_host(BROKERS[0])
    ca = TLS_CA if broker.file(TLS_CA).exists else ""
    answer = json.loads(broker.check_output("python3 -c %s %s %s %s", WHOAMI, "celery-producer", password, ca))
    assert answer["status"] == 401 and "Not management user" in answer["body"], answer


# A plain Celery app that knows nothing of the routing table (the failure: Celery's
# default queue `celery`, which no worker consumes), with the producers' broker URL.
UNROUTED = r"""
import json
from celery import Celery
import celery_stack_config

settings = celery_stack_config.settings()
app = Celery("unrouted", broker=settings["broker_url"])
# over TLS as the deployment connects (celery_stack_tls): the refusal must be the broker's
app.conf.broker_use_ssl = settings.get("broker_use_ssl")
app.conf.broker_connection_retry = False
try:
    result = app.send_task("celery_stack_demo.tasks.run_add", args=(1, 2))
    print(json.dumps({"sent": result.id}))
except Exception as error:
    print(json.dumps({"refused": f"{type(error).__name__}: {error}"}))
"""


def test_an_unrouted_producer_is_refused_not_left_pending(host):
    out = _as_app(host, UNROUTED)
    assert "refused" in out and "ACCESS_REFUSED" in out["refused"], out
    queues = inventory_host(BROKERS[0]).check_output("rabbitmqctl -q list_queues -p %s name --formatter json", VHOST)
    assert "celery" not in {q["name"] for q in json.loads(queues)}
    print("\nunrouted producer:", out["refused"])
