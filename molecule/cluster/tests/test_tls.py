"""TLS on every connection (issue 22), proved from the network and from a worker host.

The network: molecule/shared/capture.py records the scenario's docker network from the prepare
step on (prepare.yml), so the converge, the idempotence run and the tests before this module are
in the capture. This module adds a burst of tasks carrying a unique marker through both pools of
queue io (the fault suite's client, probe.py) and one fault (the io workers restarted: their
clients log in again to the broker and Redis), stops the capture and searches every TCP stream of
it for every secret of the inventory and the marker (raw, in HTTP basic auth, percent-encoded):
- none is found;
- no connection to a plain port (AMQP 5672, management 15672, Prometheus 15692) carries data
  across the network, every connection to Redis that does is TLS, and the clients use AMQP over
  TLS (5671) and Redis over TLS.
Without the prepare step's capture (molecule verify alone, the local stack) the module records
the burst and the fault only, and says so.

A worker host: plain AMQP (kombu, amqp:// on 5672) and plain Redis (redis-py) are refused by every
broker and by Redis; a TLS client trusting another CA (made on the host for the test) is refused
by them; the deployment's own client settings (celery_stack_config: broker_use_ssl,
redis_backend_use_ssl) refuse a server whose certificate another CA issued (openssl s_server on the
host); and with those settings a kombu connection does a round trip and Redis answers PING to the
results user, over TLS 1.2 or newer. Plain attempts use a made-up user and password: no test sends
a real secret in clear.

Runs under Molecule (scenario cluster) or against the local stack (the group names are the same):
  MOLECULE_INVENTORY_FILE=inventories/local pytest -p no:cacheprovider -v -s molecule/cluster/tests/test_tls.py
"""

import json
import os
import pathlib
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
# The scenarios' shared test helpers (molecule/shared/tests/stack_hosts.py) and the fault suite,
# whose client (probe.py), fault and stack description this module reuses.
sys.path.insert(0, str(REPO / "molecule" / "shared" / "tests"))
sys.path.insert(0, str(REPO / "molecule" / "shared" / "faults"))
import faults  # noqa: E402
from stack_hosts import INVENTORY, RUNNER, TLS_CA, VENV_PYTHON, group_hosts, inventory_host  # noqa: E402

pytestmark = pytest.mark.skipif(not INVENTORY, reason="needs an inventory (Molecule's, or MOLECULE_INVENTORY_FILE)")
testinfra_hosts = None  # every test reaches the hosts it needs itself

CAPTURE = REPO / "molecule" / "shared" / "capture.py"
PROBE = REPO / "molecule" / "shared" / "faults" / "probe.py"
# What prepare.yml records into.
PREPARE_PCAP = pathlib.Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent")) / "tls-capture.pcap"
BURST, BURST_SECONDS = 120, 0.2  # two worker hosts with 10 io slots each: a few seconds
FAULT = "worker-restart"  # the io workers restarted (systemctl) while the burst runs

WORKERS = group_hosts("celery_workers")
BROKERS = group_hosts("rabbitmq")
REDIS = group_hosts("redis")
# The ports (the roles' defaults unless the inventory sets them).
STACK_VARS = RUNNER.get_variables(WORKERS[0]) if RUNNER and WORKERS else {}
AMQP_PLAIN = int(STACK_VARS.get("rabbitmq_amqp_port", 5672))
AMQP_TLS = int(STACK_VARS.get("rabbitmq_amqps_port", 5671))
REDIS_PORT = int(STACK_VARS.get("redis_port", 6379))
# Ports that must carry nothing across the network once TLS is on (loopback only).
PLAIN_PORTS = {AMQP_PLAIN: "AMQP", int(STACK_VARS.get("rabbitmq_management_port", 15672)): "management HTTP",
               int(STACK_VARS.get("rabbitmq_prometheus_port", 15692)): "Prometheus HTTP"}
# The services' names, to say where a needle was found.
SERVICES = {AMQP_TLS: "AMQP TLS", 15671: "management HTTPS", 15691: "Prometheus HTTPS", 5555: "Flower",
            25672: "Erlang distribution", 4369: "epmd", REDIS_PORT: "Redis", **PLAIN_PORTS}

# Erlang distribution between the RabbitMQ nodes (quorum queue replication: every task message).
# With rabbitmq_inter_node_tls (on with celery_stack_tls) every connection to it that carries data
# must be TLS, like AMQP's and Redis'; epmd (4369) stays plain and carries node names and ports only.
DISTRIBUTION_PORT = 25672
# The inventory's value, else the role's default (on, as celery_stack_tls is on a stack this module tests).
INTER_NODE_TLS = str((RUNNER.get_variables(BROKERS[0]) if RUNNER and BROKERS else {})
                     .get("rabbitmq_inter_node_tls", True)).lower() in ("true", "yes", "on", "1")

SECRET_WORDS = ("password", "secret", "cookie", "token")


def _secrets_in(node, name=""):
    """(variable, value) of every string whose own key says it is secret, at any depth; a
    multi-line value (a PEM key) gives its long lines (a needle is one line)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _secrets_in(value, f"{name}.{key}" if name else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _secrets_in(value, f"{name}[{index}]")
    elif isinstance(node, str) and node and "{{" not in node:
        key = name.rsplit(".", 1)[-1].split("[", 1)[0].lower()
        if any(word in key for word in SECRET_WORDS):
            lines = [line.strip() for line in node.splitlines() if len(line.strip()) >= 16]
            yield from ((name, line) for line in (lines if len(lines) > 1 else [node]))


def _inventory_secrets():
    """{value: variable names} of every host's variables, as Ansible reads the inventory."""
    found = {}
    for host in RUNNER.get_hosts("all") if RUNNER else []:
        for name, value in _secrets_in(RUNNER.get_variables(host)):
            found.setdefault(value, set()).add(name)
    return {value: ", ".join(sorted(names)) for value, names in found.items()}


SECRETS = _inventory_secrets()


def _redact(text):
    for value in SECRETS:
        text = text.replace(value, "***")
    return text


def _capture(*args):
    run = subprocess.run([sys.executable, str(CAPTURE), *args], capture_output=True, text=True, check=False)
    print(run.stdout, end="")
    return run


def _network():
    """The docker network every stack host is on (the cluster's, or the local stack's)."""
    shared = None
    for name in BROKERS + REDIS + WORKERS:
        networks = set(json.loads(faults.sh("docker", "inspect", "-f", "{{json .NetworkSettings.Networks}}",
                                            name).stdout))
        shared = networks if shared is None else shared & networks
    assert shared, "the stack's hosts share no docker network"
    return sorted(shared)[0]


def _running(pcap):
    pid_file = pcap.with_name(pcap.name + ".pid")
    return pid_file.exists() and pathlib.Path(f"/proc/{pid_file.read_text().strip()}").exists()


def _burst_with_a_fault(stack, marker):
    """probe.py on the producer host sends BURST crawl_probe tasks (args: the marker, index,
    seconds) and reads their results; the fault strikes once they are sent. Returns the probe's
    report and the worker instances that completed the tasks."""
    expected = stack.consumers()
    faults.sh("docker", "cp", str(PROBE), f"{stack.producer}:{faults.PROBE_ON_HOST}")
    spec = {"run": marker, "tasks": BURST, "seconds": BURST_SECONDS, "spread": 0, "wait": 120}
    client = subprocess.Popen(["docker", "exec", stack.producer, VENV_PYTHON, faults.PROBE_ON_HOST, json.dumps(spec)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for step in ("started", "sent"):
        line = client.stdout.readline()
        if not line.startswith(step + " "):
            client.kill()
            pytest.fail(f"the probe did not start: {line}{_redact(client.stderr.read())}")
    faults.FAULTS[FAULT][1](stack)
    out, err = client.communicate(timeout=300)
    assert client.returncode == 0, _redact(err)
    report = json.loads(out.strip().splitlines()[-1])
    stack.settle(expected)  # every worker consumes again before the next test
    instances = Counter()
    for host in stack.workers:
        log = faults.on(host, f"cat {faults.PROBE_DIR}/probe-{marker}.log; rm -f {faults.PROBE_DIR}/probe-{marker}.log",
                        check=False).stdout
        instances.update(line.split()[1].split("@")[0] for line in log.splitlines() if len(line.split()) == 3)
    return report, instances


def _scan(pcap, needles, work):
    """capture.py scan with the needles in a file of this user only, deleted right after."""
    needle_file, report = work / "needles", work / "scan.json"
    descriptor = os.open(needle_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.writelines(value + "\n" for _, value in needles)
        run = _capture("scan", "--pcap", str(pcap), "--needle-file", str(needle_file), "--json", str(report))
    finally:
        needle_file.unlink(missing_ok=True)
    assert run.returncode in (0, 1) and report.exists(), _redact(run.stderr)
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """The capture (prepare's, else one of this module) around a burst and a fault, searched."""
    assert len(SECRETS) >= 5, f"too few secrets in the inventory to make this test meaningful: {len(SECRETS)}"
    stack = faults.Stack(INVENTORY)
    work = tmp_path_factory.mktemp("tls")
    pcap, own = PREPARE_PCAP, not _running(PREPARE_PCAP)
    if own:
        pcap = work / "tls-capture.pcap"
        print(f"\nno capture from the prepare step ({PREPARE_PCAP} is not being recorded): this test records "
              "its burst and fault only, not the converge")
        exclude = [arg for host in group_hosts("apt_mirror") for arg in ("--exclude-host", host)]
        started = _capture("start", "--network", _network(), "--pcap", str(pcap), *exclude)
        assert started.returncode == 0, started.stderr
    marker = f"tls-marker-{uuid.uuid4().hex}"
    try:
        report, instances = _burst_with_a_fault(stack, marker)
        time.sleep(2)  # the burst's last packets reach the file before tcpdump is stopped
    finally:
        stopped = _capture("stop", "--pcap", str(pcap))
    assert stopped.returncode == 0, stopped.stderr
    needles = sorted((name, value) for value, name in SECRETS.items()) + [("the burst's marker", marker)]
    result = _scan(pcap, needles, work)
    if not result["hits"]:
        pcap.unlink()  # nothing in it worth keeping (it is large)
    else:
        print(f"the capture is kept for a look (mode 0600): {pcap}")
    return {"report": report, "instances": instances, "scan": result, "own": own,
            "names": {index: name for index, (name, _) in enumerate(needles, 1)}}


def _server_port(scan):
    """stream name -> the port of the server side of its connection."""
    ports = {}
    for conn in scan["connections"]:
        ports[(conn["client"], conn["server"])] = ports[(conn["server"], conn["client"])] = conn["server_port"]
    return lambda stream: ports.get(tuple(stream.split(" ", 1)[0].split("->")))


def test_the_burst_ran_through_both_pools_of_io(captured):
    report, instances = captured["report"], captured["instances"]
    assert report["sent"] == BURST and report["refused"] == 0, report
    assert Counter(report["states"].values()) == {"SUCCESS": BURST}, Counter(report["states"].values())
    assert {name.rsplit("-", 1)[-1] for name in instances} == {"prefork", "threads"}, instances
    print(f"\n{BURST} tasks with the marker, the io workers restarted meanwhile ({FAULT}); completed by "
          f"{dict(instances)}")


def _service(port):
    return f"port {port} {SERVICES.get(port, '')}".strip()


def test_no_secret_and_no_task_crosses_the_network_in_clear(captured):
    scan, names = captured["scan"], captured["names"]
    port = _server_port(scan)
    # One line per secret, form and service: how often, in how many streams, one of them.
    groups = {}
    for hit in scan["hits"]:
        key = (names[hit["needle"]], hit["form"], _service(port(hit["stream"])))
        hits, streams, example = groups.get(key, (0, 0, hit["stream"]))
        groups[key] = (hits + hit["count"], streams + 1, example)
    found = [f"{name} ({form}) on {service}: {hits} hits in {streams} TCP streams, e.g. {example}"
             for (name, form, service), (hits, streams, example) in sorted(groups.items())]
    where = "since the prepare step" if not captured["own"] else "during the burst and the fault"
    assert found == [], (f"secrets or task arguments in clear on the network {where} ({len(names)} needles "
                         f"searched in {len(scan['streams'])} TCP streams):\n  " + "\n  ".join(found))


def test_no_plain_broker_or_redis_connection_crosses_the_network(captured):
    conns = [c for c in captured["scan"]["connections"] if c["bytes_to_server"] + c["bytes_to_client"]]
    plain = [f"{c['client']} -> {c['server']} ({PLAIN_PORTS[c['server_port']]}, "
             f"{c['bytes_to_server'] + c['bytes_to_client']} bytes)" for c in conns if c["server_port"] in PLAIN_PORTS]
    redis_plain = [f"{c['client']} -> {c['server']}" for c in conns
                   if c["server_port"] == REDIS_PORT and c["tls"] is False]
    assert plain == [], "plain connections to the brokers' loopback-only ports crossed the network:\n  " + \
        "\n  ".join(plain[:20])
    assert redis_plain == [], (f"plain (not TLS) connections to Redis on {REDIS_PORT}:\n  "
                               + "\n  ".join(redis_plain[:20]))
    amqps = [c for c in conns if c["server_port"] == AMQP_TLS and c["tls"]]
    redis_tls = [c for c in conns if c["server_port"] == REDIS_PORT and c["tls"]]
    assert amqps, f"no TLS connection to AMQP {AMQP_TLS} in the capture: the clients do not use amqps://"
    distribution = [c for c in conns if c["server_port"] == DISTRIBUTION_PORT]
    if INTER_NODE_TLS:
        assert [f"{c['client']} -> {c['server']}" for c in distribution if c["tls"] is False] == [], \
            f"plain Erlang distribution ({DISTRIBUTION_PORT}) between the RabbitMQ nodes"
    assert redis_tls, f"no TLS connection to Redis on {REDIS_PORT} in the capture: the clients do not use rediss://"
    print(f"\nTLS connections with data: {len(amqps)} to AMQP {AMQP_TLS}, {len(redis_tls)} to Redis {REDIS_PORT}, "
          f"{sum(bool(c['tls']) for c in distribution)} of {len(distribution)} to Erlang distribution")


# Runs on a worker host as root with the deployment's venv python: every connection attempt of
# the refusal tests, one JSON object on stdout. argv[1]: {"brokers": [...], "redis": NAME,
# "redis_port": N, "amqp_plain": N, "amqp_tls": N}. No real secret is sent in clear: plain attempts log in as a
# made-up user; the deployment's settings (and secrets) are used over TLS only.
HOST_CHECKS = r'''
import json, socket, ssl, subprocess, sys, tempfile, time, urllib.parse, uuid
import celery_stack_config
from celery import Celery

ARGS = json.loads(sys.argv[1])
NOBODY = "tls-test-nobody:not-a-real-password"


def attempt(action, *args, **options):
    """The value of a connection attempt, or its error: the chain of exception types (the
    libraries wrap the socket's and TLS's errors) and whether a certificate check failed."""
    try:
        return {"ok": True, "value": action(*args, **options)}
    except Exception as error:  # noqa: BLE001 (what failed is the result)
        chain, seen = [], error
        while seen is not None and len(chain) < 8:
            chain.append(f"{type(seen).__module__}.{type(seen).__name__}: {str(seen)[:200]}")
            seen = seen.__cause__ or seen.__context__
        return {"ok": False, "error": chain[0], "chain": chain,
                "cert_verify_failed": any("SSLCertVerificationError" in c or "certificate verify failed" in c.lower()
                                          for c in chain)}


def deployment_app(**overrides):
    """A Celery app with the deployment's settings (as every process of the application)."""
    app = Celery("celery-stack-tls-test", set_as_current=False)
    celery_stack_config.apply(app)
    app.conf.update(overrides)
    return app


def kombu_connect(url, ssl_options=False):
    from kombu import Connection
    with Connection(url, ssl=ssl_options, connect_timeout=5) as connection:
        connection.connect()
        return "connected"


def redis_ping(**options):
    import redis
    client = redis.Redis(socket_timeout=5, socket_connect_timeout=5, **options)
    try:
        return client.ping()
    finally:
        client.close()


def tls_handshake(host, port, cafile):
    """TLS with the given CA and the host's name checked; the protocol version on success."""
    context = ssl.create_default_context(cafile=cafile)
    with socket.create_connection((host, port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return tls.version()


def broker_round_trip(url=None):
    """The deployment's broker connection (or one to url with its TLS options): a message to a
    queue of its own and back; where it went and over which TLS version."""
    from kombu import Producer, Queue
    app = deployment_app(**({"broker_url": url} if url else {}))
    if not app.conf.broker_use_ssl:
        raise RuntimeError("the deployment's settings have no broker_use_ssl")
    with app.connection_for_write() as connection:
        connection.connect()
        sock = connection.connection.transport.sock
        channel = connection.channel()
        queue = Queue("", exclusive=True, auto_delete=True, channel=channel)
        queue.declare()
        token = uuid.uuid4().hex
        Producer(channel).publish({"token": token}, exchange="", routing_key=queue.name, serializer="json")
        deadline = time.monotonic() + 10
        message = queue.get(no_ack=True)
        while message is None and time.monotonic() < deadline:
            time.sleep(0.1)
            message = queue.get(no_ack=True)
        return {"scheme": urllib.parse.urlsplit(app.conf.broker_url.split(";")[0]).scheme,
                "tls": getattr(sock, "version", lambda: None)(), "peer_port": sock.getpeername()[1],
                "round_trip": bool(message and message.decode() == {"token": token})}


def results_ping(url=None):
    """PING through the deployment's result backend (or one at url with its TLS options)."""
    app = deployment_app(**({"result_backend": url} if url else {}))
    if not app.conf.redis_backend_use_ssl:
        raise RuntimeError("the deployment's settings have no redis_backend_use_ssl")
    client = app.backend.client
    pong = client.ping()
    try:
        whoami = client.execute_command("ACL", "WHOAMI")
        whoami = whoami.decode() if isinstance(whoami, bytes) else whoami
    except Exception:  # noqa: BLE001 (the user's ACL may not allow it)
        whoami = None
    return {"scheme": urllib.parse.urlsplit(app.conf.result_backend).scheme, "pong": pong,
            "user": urllib.parse.urlsplit(app.conf.result_backend).username, "whoami": whoami,
            "connection": client.connection_pool.connection_class.__name__}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


out = {"plain_amqp": {}, "other_ca_amqp": {}, "right_ca_amqp": {}}
settings = celery_stack_config.settings()
ca_file = (settings.get("broker_use_ssl") or {}).get("ca_certs") or "/etc/celery-stack/tls/ca.crt"
with tempfile.TemporaryDirectory() as tmp:
    # Another CA, made here: trusted by the wrong clients, and the certificate of the fake server.
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=celery-stack TLS test: another CA",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", f"{tmp}/other.key", "-out", f"{tmp}/other.crt"], check=True, capture_output=True)
    for broker in ARGS["brokers"]:
        out["plain_amqp"][broker] = attempt(kombu_connect, f"amqp://{NOBODY}@{broker}:{ARGS['amqp_plain']}/x")
        out["other_ca_amqp"][broker] = attempt(tls_handshake, broker, ARGS["amqp_tls"], f"{tmp}/other.crt")
        out["right_ca_amqp"][broker] = attempt(tls_handshake, broker, ARGS["amqp_tls"], ca_file)
    out["plain_redis"] = attempt(redis_ping, host=ARGS["redis"], port=ARGS["redis_port"])
    out["other_ca_redis"] = attempt(tls_handshake, ARGS["redis"], ARGS["redis_port"], f"{tmp}/other.crt")
    out["right_ca_redis"] = attempt(tls_handshake, ARGS["redis"], ARGS["redis_port"], ca_file)
    # A server on this host presenting the other CA's certificate (names right, issuer wrong).
    port = free_port()
    server = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", f"{tmp}/other.crt",
                               "-key", f"{tmp}/other.key", "-www", "-quiet"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        out["fake_broker"] = attempt(broker_round_trip, f"amqps://{NOBODY}@127.0.0.1:{port}/x")
        out["fake_redis"] = attempt(results_ping, f"rediss://127.0.0.1:{port}/0")
    finally:
        server.terminate()
        server.wait(timeout=10)
out["deployment_broker"] = attempt(broker_round_trip)
out["deployment_results"] = attempt(results_ping)
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def from_a_worker():
    """HOST_CHECKS on the first worker host."""
    assert WORKERS and BROKERS and REDIS, "the inventory needs the groups celery_workers, rabbitmq and redis"
    host = inventory_host(WORKERS[0])
    args = {"brokers": BROKERS, "redis": REDIS[0], "redis_port": REDIS_PORT, "amqp_plain": AMQP_PLAIN,
            "amqp_tls": AMQP_TLS}
    run = host.run("%s -c %s %s", VENV_PYTHON, HOST_CHECKS, json.dumps(args))
    if run.rc != 0:
        pytest.fail(f"the checks failed on {WORKERS[0]} (rc {run.rc}): {_redact(run.stderr)[-3000:]}")
    return json.loads(_redact(run.stdout).strip().splitlines()[-1])


def _spoke(result, *protocol_errors):
    """The server answered in its protocol: the attempt worked, or failed with an error of it."""
    return result["ok"] or any(name in link for link in result["chain"] for name in protocol_errors)


def test_plain_amqp_is_refused_by_every_broker(from_a_worker):
    answered = {broker: result.get("error", "connected") for broker, result in from_a_worker["plain_amqp"].items()
                # an AMQP reply (a wrong login, a vhost refused) is the broker speaking plain AMQP
                if _spoke(result, "amqp.exceptions.AccessRefused", "amqp.exceptions.NotAllowed",
                          "amqp.exceptions.ConnectionForced")}
    assert answered == {}, (f"brokers that speak plain AMQP on {AMQP_PLAIN} to {WORKERS[0]} (it must listen on "
                            f"loopback only): {answered}")


def test_plain_redis_is_refused(from_a_worker):
    result = from_a_worker["plain_redis"]
    assert not _spoke(result, "AuthenticationError", "ResponseError"), (
        f"{REDIS[0]}:{REDIS_PORT} answers plain Redis to {WORKERS[0]}: {result.get('error', 'PONG')}")


def test_a_client_trusting_another_ca_is_refused(from_a_worker):
    results = {f"{broker}:{AMQP_TLS}": r for broker, r in from_a_worker["other_ca_amqp"].items()}
    results[f"{REDIS[0]}:{REDIS_PORT}"] = from_a_worker["other_ca_redis"]
    wrong = {where: r.get("error", f"accepted ({r.get('value')})") for where, r in results.items()
             if not (not r["ok"] and r["cert_verify_failed"])}
    assert wrong == {}, f"not refused for its certificate by a client trusting another CA: {wrong}"


def test_the_deployment_refuses_a_server_with_a_certificate_of_another_ca(from_a_worker):
    for name, setting in (("fake_broker", "broker_use_ssl"), ("fake_redis", "redis_backend_use_ssl")):
        result = from_a_worker[name]
        assert not result["ok"], f"the deployment's {setting} trusted a server with another CA's certificate"
        assert result["cert_verify_failed"], (f"the deployment's client ({setting}) did not refuse the server for "
                                              f"its certificate: {result['chain']}")


def test_the_deployment_clients_work_over_tls_1_2_or_newer(from_a_worker):
    broker, results = from_a_worker["deployment_broker"], from_a_worker["deployment_results"]
    assert broker["ok"], f"the deployment's broker connection failed: {broker['chain']}"
    assert broker["value"]["scheme"] == "amqps" and broker["value"]["peer_port"] == AMQP_TLS, broker["value"]
    assert broker["value"]["tls"] in ("TLSv1.2", "TLSv1.3") and broker["value"]["round_trip"], broker["value"]
    assert results["ok"], f"the deployment's result backend failed: {results['chain']}"
    assert results["value"]["scheme"] == "rediss" and results["value"]["pong"] is True, results["value"]
    assert results["value"]["connection"] == "SSLConnection", results["value"]
    assert results["value"]["whoami"] in (None, results["value"]["user"]), results["value"]
    # The right CA and every server's name: the refusals above were for the CA, not a broken port.
    handshakes = {**{f"{b}:{AMQP_TLS}": r for b, r in from_a_worker["right_ca_amqp"].items()},
                  f"{REDIS[0]}:{REDIS_PORT}": from_a_worker["right_ca_redis"]}
    versions = {where: r["value"] if r["ok"] else r["error"] for where, r in handshakes.items()}
    assert all(version in ("TLSv1.2", "TLSv1.3") for version in versions.values()), versions
    print(f"\nfrom {WORKERS[0]}: broker {broker['value']}, results {results['value']}, handshakes {versions}")


# Runs on a broker host as root: three Erlang nodes of the broker's own account (its cookie, from
# its home; never on a command line) ping a RabbitMQ node over Erlang distribution: plain, over TLS
# with a certificate of another CA (made here; the deployment's CA trusted, so only the node can
# refuse it), and over TLS with the node's own options file (the deployment's certificate). Prints
# one "case pong|pang" line each. argv: $1 the target node, $2 the node's options file, $3 the CA
# bundle, $4 this host's name.
DISTRIBUTION_CHECKS = r'''
set -eu
target=$1 optfile=$2 ca=$3 here=$4
work=$(mktemp -d /var/tmp/inter-node-tls-test.XXXXXX)
trap 'rm -rf "$work"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj "/CN=celery-stack TLS test: another CA" -addext "subjectAltName=DNS:$here" \
  -keyout "$work/other.key" -out "$work/other.crt" 2>/dev/null
cat > "$work/other.config" <<EOF
[{server, [{cacertfile, "$ca"}, {certfile, "$work/other.crt"}, {keyfile, "$work/other.key"},
           {verify, verify_peer}, {fail_if_no_peer_cert, true}]},
 {client, [{cacertfile, "$ca"}, {certfile, "$work/other.crt"}, {keyfile, "$work/other.key"},
           {verify, verify_peer}]}].
EOF
chown -R rabbitmq: "$work"
ping() {
  su rabbitmq -s /bin/sh -c "cd $work && timeout 60 erl -noinput -sname tls-test-$1-$$ $2 \
    -eval 'io:format(\"~s~n\", [net_adm:ping(list_to_atom(\"$target\"))]), init:stop().'" 2>&1 \
    | grep -E '^(pong|pang)$' || echo none
}
echo "plain $(ping plain '')"
echo "other-ca $(ping other-ca "-proto_dist inet_tls -ssl_dist_optfile $work/other.config")"
echo "deployment $(ping deployment "-proto_dist inet_tls -ssl_dist_optfile $optfile")"
'''


@pytest.mark.skipif(not INTER_NODE_TLS, reason="rabbitmq_inter_node_tls is off in this inventory")
def test_erlang_distribution_refuses_plain_peers_and_other_cas():
    """A peer with the cluster's cookie but without a certificate of the CA cannot reach a node."""
    here, there = inventory_host(BROKERS[0]), inventory_host(BROKERS[-1])
    target = "rabbit@" + there.check_output("hostname -s")
    run = here.run("bash -c %s -- %s %s %s %s", DISTRIBUTION_CHECKS, target, "/etc/rabbitmq/inter_node_tls.config",
                   TLS_CA, here.check_output("hostname -s"))
    assert run.rc == 0, _redact(run.stderr)
    answers = dict(line.split() for line in run.stdout.splitlines() if len(line.split()) == 2)
    print(f"\nfrom {BROKERS[0]} to {target} over Erlang distribution: {answers}")
    assert answers == {"plain": "pang", "other-ca": "pang", "deployment": "pong"}, answers
