"""The Django example (examples/django) deployed by the bundle, checked by behaviour from the web
host (a producer: it runs no worker), as the web app's own account:

- a management command enqueues the original note's `app_task.tasks.run_add`; it runs on the cpu
  queue's workers on the worker host and its result is read back on the web host, from the row
  django-celery-results wrote in PostgreSQL;
- a periodic task created in the database through django-celery-beat is sent by beat (the
  DatabaseScheduler) and executed by the io queue's workers, which write Visit rows;
- workers and beat run with the app's environment (DJANGO_SETTINGS_MODULE, the database);
- with celery_stack_tls_client_certificates on (group_vars/django_example.yml), RabbitMQ's TLS
  listener refuses a client that trusts the deployment's CA but shows no certificate, and accepts
  the same client with the certificate the deployment gives the web app.
"""

import json
import pathlib
import sys
import time
import uuid

# The scenarios' shared test helpers (molecule/shared/tests/stack_hosts.py).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "tests"))
from stack_hosts import VENV_PYTHON, group_hosts, inventory_host  # noqa: E402

WEB = group_hosts("celery_producers")
WORKERS = group_hosts("celery_workers")
APP_USER = "web"

testinfra_hosts = [f"ansible://{name}" for name in WEB]

# django-admin with the deployment's environment (the web app's own units would read the same
# EnvironmentFile); argv: the command and its arguments.
DJANGO_ADMIN = r"""
import sys, celery_stack_config
celery_stack_config.load_environment()
from django.core.management import execute_from_command_line
execute_from_command_line(["django-admin"] + sys.argv[1:])
"""

# The result row django-celery-results stored for a task id.
RESULT_ROW = r"""
import json, sys, celery_stack_config
celery_stack_config.load_environment()
import django
django.setup()
from django_celery_results.models import TaskResult
row = TaskResult.objects.get(task_id=sys.argv[1])
print(json.dumps({"status": row.status, "task_name": row.task_name, "worker": row.worker,
                  "result": json.loads(row.result)}))
"""


def _as_app(host, script, *args):
    cmd = "runuser -u %s -- %s -c %s" + " %s" * len(args)
    return json.loads(host.check_output(cmd, APP_USER, VENV_PYTHON, script, *args).splitlines()[-1])


def test_a_management_command_enqueues_run_add_and_reads_the_result(host):
    sent = _as_app(host, DJANGO_ADMIN, "enqueue_add", "2", "3", "--wait", "120")
    value = sent["result"]
    assert value["result"] == 5
    assert value["queue"] == "cpu" and value["hostname"].split("@")[0] in ("cpu-prefork", "cpu-threads"), sent
    assert value["hostname"].split("@")[1] != host.check_output("hostname")
    row = _as_app(host, RESULT_ROW, sent["task_id"])
    assert row["status"] == "SUCCESS" and row["task_name"] == "app_task.tasks.run_add", row
    assert row["worker"] == value["hostname"] and row["result"]["result"] == 5, row
    print("\nrun_add from the web host:", sent, "\nresult row:", row)


def test_a_periodic_task_in_the_database_is_run_by_the_workers(host):
    label = "beat-" + uuid.uuid4().hex[:8]
    _as_app(host, DJANGO_ADMIN, "schedule_visit", label, "--every", "2")
    visits = {}
    for _ in range(60):  # beat's DatabaseScheduler picks up a changed schedule within seconds
        visits = _as_app(host, DJANGO_ADMIN, "count_visits", label)
        if visits["count"] >= 2:
            break
        time.sleep(2)
    assert visits["count"] >= 2, visits
    assert all(worker.split("@")[0] in ("io-prefork", "io-threads") for worker in visits["workers"]), visits
    print("\nperiodic task from the database:", visits)


def test_workers_and_beat_run_with_the_apps_environment():
    worker = inventory_host(WORKERS[0])
    assert worker.service("celery-beat.service").is_running
    pid = worker.check_output("systemctl show -p MainPID --value celery-beat.service")
    environ = worker.check_output("tr '\\0' '\\n' < /proc/%s/environ", pid).splitlines()
    assert "DJANGO_SETTINGS_MODULE=mysite.settings" in environ
    assert "MYSITE_BEAT_SCHEDULER=database" in environ
    cmdline = worker.check_output("tr '\\0' ' ' < /proc/%s/cmdline", pid)
    assert "celery_stack_app beat" in cmdline
    log = worker.check_output("journalctl -u celery-beat.service --no-pager -o cat | tail -200")
    assert "DatabaseScheduler" in log, log


# argv: none. As the web app's account: connect to every broker of the deployment's URL list
# with the deployment's TLS options as they are, and once more without the client certificate
# (the same CA, the same name check). Prints {broker: {"deployed": verdict, "no_client_cert":
# verdict}}, a verdict being "accepted" or "refused: <error>".
CLIENT_CERTIFICATE = r"""
import json
from kombu import Connection
import celery_stack_config

settings = celery_stack_config.settings()
deployed = settings.get("broker_use_ssl") or {}
without = {k: v for k, v in deployed.items() if k not in ("certfile", "keyfile")}

def verdict(url, options):
    try:
        # the transport's own connect, without kombu's retries (one refusal, not a retry loop);
        # a fresh dict each time: kombu writes the dialled host into it
        with Connection(url, ssl=dict(options), connect_timeout=10) as connection:
            connection.transport.establish_connection()
        return "accepted"
    except Exception as error:
        return f"refused: {type(error).__name__}: {error}"

print(json.dumps({url.split("@")[-1]: {"deployed": verdict(url, deployed), "no_client_cert": verdict(url, without)}
                  for url in settings["broker_url"].split(";")}))
"""


def test_rabbitmq_refuses_a_tls_client_without_a_client_certificate(host):
    out = _as_app(host, CLIENT_CERTIFICATE)
    print("\nTLS clients of RabbitMQ:", json.dumps(out, indent=1))
    assert out, out
    for broker, verdicts in out.items():
        assert ":5671/" in broker, out
        # the deployment's own client (its certificate and the key copy the web app reads) gets in ...
        assert verdicts["deployed"] == "accepted", out
        # ... the same client without a certificate is turned away in the TLS handshake
        refused = verdicts["no_client_cert"]
        assert refused.startswith("refused: ") and "certificate" in refused.lower(), out
