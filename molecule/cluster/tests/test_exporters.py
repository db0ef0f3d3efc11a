"""The Prometheus exporters (celery_stack_exporters, roles/prometheus_exporters), checked by
behaviour on every host of the stack, each scraped as Prometheus would: over HTTPS at the address
it listens on, the server's certificate checked against the stack's CA and its name, showing a
client certificate of the CA (the host's own: roles/tls issues them for clientAuth too).

- the node exporter answers with its metrics and the stack's textfile metrics: the notAfter of the
  host's certificate and CA (celery_stack_tls_certificate_not_after_timestamp_seconds, equal to
  the certificate's), and on worker hosts the health check's restarts for every worker unit
  (celery_stack_health_restarts_total) and the time of its last run;
- refused: a TLS client without a client certificate (handshake alert), plain HTTP (400, no
  metric);
- the redis exporter (redis hosts) reports redis_up 1 and the memory limit
  (redis_memory_max_bytes) through its own ACL user, whose password is in no command line and in
  a root-only file;
- a worker the health check restarts (SIGSTOP, with the watchdog switched off for the test, or
  the watchdog would restart it first) raises its counter by one.

Every test skips on a host where celery_stack_exporters is off (the default without a host in
the group celery_monitoring). Against the local stack (it has a monitoring host):
  pytest -p no:cacheprovider -v --hosts='ansible://all' --ansible-inventory=inventories/local \\
    --connection=ansible molecule/cluster/tests/test_exporters.py
"""

import base64
import json
import pathlib
import re
import sys
import time

import pytest
from cryptography import x509

# The scenarios' shared test helpers (molecule/shared/tests/stack_hosts.py).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "tests"))
from stack_hosts import INVENTORY, TLS_CA, group_hosts, inventory_host  # noqa: E402

STACK_GROUPS = ("rabbitmq", "redis", "celery_workers", "celery_producers", "celery_monitoring")
testinfra_hosts = [f"ansible://{group}" for group in STACK_GROUPS] if INVENTORY else []

NODE_DEFAULT = "/etc/default/prometheus-node-exporter"
REDIS_DEFAULT = "/etc/default/prometheus-redis-exporter"
TLS_METRIC = "celery_stack_tls_certificate_not_after_timestamp_seconds"
RESTARTS = "celery_stack_health_restarts_total"

# Runs on the host: one GET of argv[1] at address argv[2] (https with the CA argv[3], the name
# argv[4] and, when given, the client certificate argv[5] / key argv[6]; http when argv[3] is "").
# Prints {"status", "body"} or {"error"}.
SCRAPE = r"""
import http.client, json, socket, ssl, sys
url, address, ca, name = sys.argv[1:5]
host, port = address.rsplit(":", 1)
try:
    connection = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=20)
    if ca:
        context = ssl.create_default_context(cafile=ca)
        if len(sys.argv) > 5:
            context.load_cert_chain(sys.argv[5], sys.argv[6])
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=20)
        connection.sock = context.wrap_socket(sock, server_hostname=name)
    connection.request("GET", url)
    answer = connection.getresponse()
    print(json.dumps({"status": answer.status, "body": answer.read().decode()}))
except (OSError, http.client.HTTPException) as error:
    print(json.dumps({"error": f"{error.__class__.__name__}: {error}"}))
"""


def _vars(host):
    return host.ansible.get_variables()


def _exporters_on(host):
    """celery_stack_exporters as the role decides it: the inventory's value, else on when the
    group celery_monitoring has hosts."""
    variables = _vars(host)
    value = variables.get("celery_stack_exporters")
    if value is None:
        return bool(variables.get("groups", {}).get("celery_monitoring"))
    return str(value).lower() in ("true", "1", "yes")


@pytest.fixture
def exporters(host):
    if not set(STACK_GROUPS) & set(_vars(host)["group_names"]):
        pytest.skip("not a host of the stack")
    if not _exporters_on(host):
        pytest.skip("celery_stack_exporters is off on this host")
    return host


def _listen(host, default_file):
    with host.sudo():
        args = host.file(default_file).content_string
    return re.search(r"--web\.listen-address=(\S+)", args).group(1)


def _scrape(host, default_file, client_certificate=True, tls=True, path="/metrics"):
    """GET path from the exporter of default_file, as the host itself (its certificate as the
    client's: any certificate of the CA)."""
    name = _vars(host)["inventory_hostname"]
    ca = TLS_CA if tls and host.file(TLS_CA).exists else ""
    argv = [path, _listen(host, default_file), ca, name]
    if ca and client_certificate:
        argv += [f"/etc/celery-stack/tls/{name}.crt", f"/etc/celery-stack/tls/{name}.key"]
    code = base64.b64encode(SCRAPE.encode()).decode()
    with host.sudo():
        out = host.check_output(f"python3 -c 'import base64; exec(base64.b64decode(\"{code}\"))' "
                                + " ".join(f"'{a}'" for a in argv))
    return json.loads(out)


def _metric(body, name, labels=""):
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", body, re.M)
    return float(found.group(1)) if found else None


def _consumers(host, queue):
    """The consumers of a routed queue, as the first broker counts them."""
    broker = inventory_host(group_hosts("rabbitmq")[0])
    listing = broker.check_output("rabbitmqctl -q list_queues -p %s name consumers --formatter json",
                                  _vars(host).get("celery_stack_broker_vhost", "celery"))
    return {q["name"]: q["consumers"] for q in json.loads(listing)}.get(queue)


def _tls_on(host):
    return host.file(TLS_CA).exists


def test_the_node_exporter_serves_its_and_the_stacks_metrics_to_a_ca_client(exporters):
    host = exporters
    answer = _scrape(host, NODE_DEFAULT)
    assert answer.get("status") == 200, answer
    body = answer["body"]
    assert _metric(body, "node_textfile_scrape_error") == 0
    assert "node_cpu_seconds_total" in body and "node_memory_MemAvailable_bytes" in body
    if _tls_on(host):
        name = _vars(host)["inventory_hostname"]
        cert = x509.load_pem_x509_certificate(host.file(f"/etc/celery-stack/tls/{name}.crt").content)
        not_after = _metric(body, TLS_METRIC, '{certificate="host"}')
        assert not_after == int(cert.not_valid_after_utc.timestamp()), body
        assert _metric(body, TLS_METRIC, '{certificate="ca"}') >= not_after
    if "celery_workers" in _vars(host)["group_names"]:
        instances = json.loads(host.file("/etc/celery-stack/workers.json").content_string)
        for entry in instances:
            assert _metric(body, RESTARTS, f'{{unit="celery-worker@{entry["instance"]}.service"}}') is not None, body
        assert time.time() - _metric(body, "celery_stack_health_last_run_timestamp_seconds") < 300


def test_the_exporters_refuse_clients_without_a_certificate_and_plain_http(exporters):
    host = exporters
    if not _tls_on(host):
        pytest.skip("celery_stack_tls is off: the exporters serve plain HTTP")
    files = [NODE_DEFAULT] + ([REDIS_DEFAULT] if "redis" in _vars(host)["group_names"] else [])
    for default_file in files:
        anonymous = _scrape(host, default_file, client_certificate=False)
        assert "error" in anonymous and "certificate" in anonymous["error"].lower(), anonymous
        plain = _scrape(host, default_file, tls=False)
        assert plain.get("status") == 400 and "redis_up" not in plain["body"] and "node_" not in plain["body"], plain


def test_the_redis_exporter_reports_redis_through_its_own_user(exporters):
    host = exporters
    if "redis" not in _vars(host)["group_names"]:
        pytest.skip("not a redis host")
    answer = _scrape(host, REDIS_DEFAULT)
    assert answer.get("status") == 200, answer
    assert _metric(answer["body"], "redis_up") == 1
    assert _metric(answer["body"], "redis_memory_max_bytes") > 0
    assert _metric(answer["body"], "redis_memory_used_bytes") > 0
    password = _vars(host)["celery_stack_redis_exporter_password"]
    default = host.file(REDIS_DEFAULT)
    assert (default.user, default.mode) == ("root", 0o600)
    with host.sudo():
        assert password not in host.check_output("ps -eo args")
        assert "--redis.user=" in host.check_output("ps -eo args | grep [p]rometheus-redis-exporter")


def test_a_worker_restarted_by_the_health_check_raises_its_counter(exporters):
    host = exporters
    groups = _vars(host)["groups"]
    if _vars(host)["inventory_hostname"] != groups["celery_workers"][-1]:
        pytest.skip("one worker host is enough")
    instance = "io-threads"
    unit = f"celery-worker@{instance}.service"
    labels = f'{{unit="{unit}"}}'
    dropin = f"/run/systemd/system/{unit}.d"
    before = _metric(_scrape(host, NODE_DEFAULT)["body"], RESTARTS, labels)
    consumers = _consumers(host, "io")
    with host.sudo():
        # The watchdog (WatchdogSec=) would restart a stopped worker before the check's misses add up.
        host.check_output(f"mkdir -p {dropin} && printf '[Service]\\nWatchdogSec=0\\n' > {dropin}/zz-test.conf "
                          f"&& systemctl daemon-reload && systemctl restart {unit}")
        try:
            interval = int(_vars(host).get("celery_worker_health_interval", 60))
            time.sleep(interval + 5)  # the check's grace for a started instance
            pid = host.check_output(f"systemctl show -p MainPID --value {unit}")
            host.check_output(f"kill -STOP {pid}")
            deadline = time.time() + 5 * interval + 60
            while _metric(_scrape(host, NODE_DEFAULT)["body"], RESTARTS, labels) == before:
                assert time.time() < deadline, host.check_output("journalctl -u celery-worker-health -n 20 --no-pager")
                time.sleep(3)
            assert _metric(_scrape(host, NODE_DEFAULT)["body"], RESTARTS, labels) == before + 1
        finally:
            host.run(f"rm -rf {dropin} && systemctl daemon-reload && systemctl restart {unit}")
    # The next tests (the fault suite) take the queues' consumers as they find them: leave every
    # worker consuming again, as before.
    deadline = time.time() + 120
    while _consumers(host, "io") != consumers:
        assert time.time() < deadline, f"io has {_consumers(host, 'io')} consumers, had {consumers}"
        time.sleep(2)
