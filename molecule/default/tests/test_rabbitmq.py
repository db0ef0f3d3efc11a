"""Behaviour of the RabbitMQ broker (role rabbitmq), checked from inside each rabbitmq host.

AMQP is spoken by a minimal AMQP 0-9-1 client written with the Python standard library
(AMQP_CLIENT below), run with the host's own python3: the broker hosts carry no AMQP library,
installing one only for the test would change the host under test, and the Celery venv exists
only where a worker runs. The client does the real protocol (SASL PLAIN or ANONYMOUS login,
vhost open, queue declare, publish, get), so "refused" means the broker refused.

Passwords: by default the local inventory's (inventories/local/group_vars/all/). A scenario
that rotates passwords (a second converge with changed values) tells the test through
environment variables:
  RABBITMQ_TEST_APP_PASSWORD      the application user's current password
  RABBITMQ_TEST_APP_OLD_PASSWORD  its previous password, which must now be refused
  RABBITMQ_TEST_ADMIN_PASSWORD, RABBITMQ_TEST_ADMIN_OLD_PASSWORD   the same for ops-admin
"""

import json
import os
import pathlib
import re

import pytest
import yaml
from deployed_tls import tls_ca

if os.environ.get("MOLECULE_INVENTORY_FILE"):
    import testinfra.utils.ansible_runner

    testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
        os.environ["MOLECULE_INVENTORY_FILE"]
    ).get_hosts("rabbitmq")

INVENTORY_VARS = pathlib.Path(__file__).resolve().parents[3] / "inventories/local/group_vars/all"
ADMIN = "ops-admin"


def _inventory():
    values = {}
    for name in ("celery_stack.yml", "rabbitmq.yml"):
        with open(INVENTORY_VARS / name, encoding="utf-8") as handle:
            values.update(yaml.safe_load(handle))
    return values


INV = _inventory()
VHOST = INV["celery_stack_broker_vhost"]
APP_USER = INV["celery_stack_broker_user"]
APP_PASSWORD = os.environ.get("RABBITMQ_TEST_APP_PASSWORD", INV["celery_stack_broker_password"])
APP_OLD_PASSWORD = os.environ.get("RABBITMQ_TEST_APP_OLD_PASSWORD")
ADMIN_PASSWORD = os.environ.get(
    "RABBITMQ_TEST_ADMIN_PASSWORD",
    next(u["password"] for u in INV["rabbitmq_users"] if u["name"] == ADMIN),
)
ADMIN_OLD_PASSWORD = os.environ.get("RABBITMQ_TEST_ADMIN_OLD_PASSWORD")



# argv: MECHANISM USER PASSWORD VHOST ACTION [CA]   (ACTION: open | roundtrip; CA: over TLS, port 5671)
# prints one JSON object: {"ok": bool, "stage": where it stopped, "detail": server's reply}
AMQP_CLIENT = r'''
import json, socket, ssl, struct, sys, uuid
mech, user, password, vhost, action = sys.argv[1:6]
ca = sys.argv[6] if len(sys.argv) > 6 else ""
sock = socket.create_connection(("127.0.0.1", 5671 if ca else 5672), timeout=10)
if ca:
    sock = ssl.create_default_context(cafile=ca).wrap_socket(sock, server_hostname="127.0.0.1")
buf = b""
def recv(n):
    global buf
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed by the broker")
        buf += chunk
    out, buf = buf[:n], buf[n:]
    return out
def frame():
    ftype, chan, size = struct.unpack(">BHI", recv(7))
    payload = recv(size); recv(1)
    return ftype, chan, payload
def method():
    while True:
        ftype, chan, payload = frame()
        if ftype == 1:
            return struct.unpack(">HH", payload[:4]), payload[4:]
def send(ftype, chan, payload):
    sock.sendall(struct.pack(">BHI", ftype, chan, len(payload)) + payload + b"\xce")
def call(chan, cls, mid, args):
    send(1, chan, struct.pack(">HH", cls, mid) + args)
def sstr(s):
    b = s.encode(); return struct.pack(">B", len(b)) + b
def lstr(b):
    return struct.pack(">I", len(b)) + b
def closed(ids, args):
    code = struct.unpack(">H", args[:2])[0]
    text = args[3:3 + args[2]].decode()
    return "%s %s" % (code, text)
def done(ok, stage, detail=""):
    print(json.dumps({"ok": ok, "stage": stage, "detail": detail})); sys.exit(0)
try:
    sock.sendall(b"AMQP\x00\x00\x09\x01")
    ids, args = method()                                   # connection.start
    response = ("\0%s\0%s" % (user, password)).encode() if mech == "PLAIN" else b""
    # Without this capability the broker answers a failed login by just dropping the socket.
    caps = sstr("authentication_failure_close") + b"t\x01"
    props = sstr("capabilities") + b"F" + lstr(caps)
    call(0, 10, 11, lstr(props) + sstr(mech) + lstr(response) + sstr("en_US"))  # start-ok
    ids, args = method()
    if ids != (10, 30):                                    # not connection.tune: refused
        done(False, "login", closed(ids, args) if ids == (10, 50) else str(ids))
    call(0, 10, 31, args[:2] + args[2:6] + struct.pack(">H", 0))                # tune-ok
    call(0, 10, 40, sstr(vhost) + sstr("") + b"\x00")                           # open
    ids, args = method()
    if ids != (10, 41):
        done(False, "vhost", closed(ids, args) if ids == (10, 50) else str(ids))
    if action == "open":
        done(True, "vhost")
    call(1, 20, 10, sstr(""))                                                   # channel.open
    method()
    queue = "test-rabbitmq-" + uuid.uuid4().hex
    table = sstr("x-queue-type") + b"S" + lstr(b"classic")
    # exclusive (deleted with the connection), explicitly classic: independent of
    # default_queue_type
    call(1, 50, 10, struct.pack(">H", 0) + sstr(queue) + b"\x04" + lstr(table))
    ids, args = method()
    if ids != (50, 11):
        done(False, "declare", closed(ids, args))
    body = ("hello " + queue).encode()
    call(1, 60, 40, struct.pack(">H", 0) + sstr("") + sstr(queue) + b"\x00")    # publish
    send(2, 1, struct.pack(">HHQH", 60, 0, len(body), 0))
    send(3, 1, body)
    call(1, 60, 70, struct.pack(">H", 0) + sstr(queue) + b"\x01")               # get, no-ack
    ids, args = method()
    if ids != (60, 71):
        done(False, "get", closed(ids, args) if ids[1] == 40 else str(ids))
    frame()                                                                     # content header
    got = frame()[2]
    done(got == body, "roundtrip", got.decode())
except (OSError, EOFError, struct.error) as exc:
    done(False, "io", str(exc))
'''

# argv: USER PASSWORD PATH [CA]   prints {"status": HTTP status, "body": parsed JSON or text}
HTTP_CLIENT = r'''
import base64, json, ssl, sys, urllib.error, urllib.request
user, password, path = sys.argv[1:4]
ca = sys.argv[4] if len(sys.argv) > 4 else ""
context = ssl.create_default_context(cafile=ca) if ca else None
request = urllib.request.Request(("https://127.0.0.1:15671" if ca else "http://127.0.0.1:15672") + path)
token = base64.b64encode(("%s:%s" % (user, password)).encode()).decode()
request.add_header("Authorization", "Basic " + token)
try:
    with urllib.request.urlopen(request, timeout=10, context=context) as answer:
        status, body = answer.status, answer.read().decode()
except urllib.error.HTTPError as exc:
    status, body = exc.code, exc.read().decode()
try:
    body = json.loads(body)
except ValueError:
    pass
print(json.dumps({"status": status, "body": body}))
'''


def amqp(host, user, password, vhost, action="roundtrip", mechanism="PLAIN"):
    result = host.run("python3 -c %s %s %s %s %s %s %s", AMQP_CLIENT, mechanism, user, password, vhost, action,
                      tls_ca(host))
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def http(host, user, password, path):
    result = host.run("python3 -c %s %s %s %s %s", HTTP_CLIENT, user, password, path, tls_ca(host))
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def _policy(host, package):
    """Installed version, candidate, and the version table of `apt-cache policy PACKAGE`."""
    out = host.check_output("apt-cache policy %s", package).splitlines()
    installed = next(line.split(":", 1)[1].strip() for line in out if line.strip().startswith("Installed:"))
    candidate = next(line.split(":", 1)[1].strip() for line in out if line.strip().startswith("Candidate:"))
    return installed, candidate, out


def _installed_entry(table):
    """(priority, source lines) of the installed (***) version in an apt-cache policy table."""
    for index, line in enumerate(table):
        if line.strip().startswith("***"):
            priority = int(line.split()[-1])
            sources = []
            for follow in table[index + 1:]:
                if not follow.startswith("        "):
                    break
                sources.append(follow.strip())
            return priority, sources
    raise AssertionError("no installed version in:\n" + "\n".join(table))


def test_rabbitmq_server_came_from_the_mirror_and_is_pinned(host):
    installed, candidate, table = _policy(host, "rabbitmq-server")
    priority, sources = _installed_entry(table)
    # The mirror's rebuilds carry a suffix Debian never ships; their only source is the mirror
    # (+mirror1 as converged; +mirror2 in scenario cluster, after its upgrade test).
    assert re.search(r"\+mirror[12]$", installed), installed
    assert any("/rabbitmq-server/" in source for source in sources), sources
    assert not any("deb.debian.org" in source for source in sources), sources
    # The pin (priority 1001) holds: apt's candidate IS the installed version.
    assert priority == 1001
    assert candidate == installed


def test_erlang_is_pinned(host):
    for package in ("erlang-base", "erlang-crypto", "erlang-ssl"):
        installed, candidate, table = _policy(host, package)
        priority, _ = _installed_entry(table)
        assert installed.startswith("1:"), (package, installed)
        assert priority == 1001, package
        assert candidate == installed, package


def test_apt_upgrade_would_not_move_the_pinned_packages(host):
    simulated = host.check_output("apt-get -s -o Debug::NoLocking=1 dist-upgrade")
    moved = [line for line in simulated.splitlines() if line.startswith("Inst ")
             and (line.split()[1] == "rabbitmq-server" or line.split()[1].startswith("erlang"))]
    assert moved == []


def test_service_is_active_and_enabled(host):
    service = host.service("rabbitmq-server")
    assert service.is_running
    assert service.is_enabled


# AMQP, management, Prometheus: (plain port, TLS port)
PORTS = {"amqp": (5672, 5671), "management": (15672, 15671), "prometheus": (15692, 15691)}


@pytest.mark.parametrize("listener", sorted(PORTS))
def test_listening(host, listener):
    # Any address: AMQP listens dual-stack on [::], the HTTP ports on 0.0.0.0. With TLS, only the
    # TLS port across the network: no plain listener, except RabbitMQ 3.x's Prometheus one, which
    # the role can only bind to loopback (advanced.config.j2).
    plain, tls = PORTS[listener]
    wanted, absent = (tls, plain) if tls_ca(host) else (plain, tls)
    assert host.check_output("ss -Htln 'sport = :%d'" % wanted).strip()
    local = [line.split()[3] for line in host.check_output("ss -Htln 'sport = :%d'" % absent).splitlines()]
    assert [address for address in local if not address.startswith(("127.0.0.1:", "[::1]:"))] == [], local


def test_open_files_limit(host):
    assert int(host.check_output("systemctl show -p LimitNOFILE --value rabbitmq-server")) >= 50000


def test_prometheus_endpoint_serves_metrics(host):
    ca = tls_ca(host)
    url = "https://127.0.0.1:15691/metrics" if ca else "http://127.0.0.1:15692/metrics"
    metrics = host.check_output("python3 -c %s %s %s", "import ssl, sys, urllib.request; print(urllib.request.urlopen("
                                "sys.argv[1], timeout=10, context=ssl.create_default_context(cafile=sys.argv[2]) "
                                "if sys.argv[2] else None).read().decode())", url, ca)
    assert "rabbitmq_" in metrics


def test_administrator_authenticates_to_the_management_api(host):
    answer = http(host, ADMIN, ADMIN_PASSWORD, "/api/whoami")
    assert answer["status"] == 200, answer
    tags = answer["body"]["tags"]
    assert "administrator" in (tags if isinstance(tags, list) else tags.split(","))


def test_app_user_publishes_and_consumes_on_its_vhost(host):
    result = amqp(host, APP_USER, APP_PASSWORD, VHOST)
    assert result == {"ok": True, "stage": "roundtrip", "detail": result["detail"]}, result


def test_app_user_is_refused_on_another_vhost(host):
    result = amqp(host, APP_USER, APP_PASSWORD, "/", action="open")
    assert result["ok"] is False and result["stage"] == "vhost", result
    assert result["detail"].startswith("530"), result  # NOT_ALLOWED


def test_app_user_has_no_management_access(host):
    assert http(host, APP_USER, APP_PASSWORD, "/api/whoami")["status"] in (401, 403)


def test_guest_is_refused(host):
    result = amqp(host, "guest", "guest", "/", action="open")
    assert result["stage"] == "login" and result["detail"].startswith("403"), result  # ACCESS_REFUSED
    assert http(host, "guest", "guest", "/api/whoami")["status"] == 401


def test_anonymous_login_is_refused(host):
    result = amqp(host, "", "", "/", action="open", mechanism="ANONYMOUS")
    assert result["ok"] is False and result["stage"] in ("login", "io"), result


def test_wrong_password_is_refused(host):
    result = amqp(host, APP_USER, APP_PASSWORD + "-wrong", VHOST, action="open")
    assert result["ok"] is False and result["stage"] == "login", result
    assert result["detail"].startswith("403"), result


def test_console_drift_is_repaired(host):
    """The workers' user keeps exactly its tags (none), and every routed queue its dead-letter policy,
    even after a console session changed them (molecule/default/side_effect.yml): a converge
    compares the broker's definitions with the inventory and puts back what differs."""
    users = {u["user"]: u["tags"] for u in json.loads(host.check_output("rabbitmqctl -q list_users --formatter json"))}
    assert users[APP_USER] in ([], ""), users
    policies = {p["name"] for p in json.loads(host.check_output(
        "rabbitmqctl -q list_policies -p %s --formatter json", VHOST))}
    absent = set(filter(None, os.environ.get("CELERY_STACK_ABSENT_QUEUES", "").split(",")))
    wanted = {f"celery-stack-dead-letter-{q['name']}" for q in INV["celery_stack_queues"] if q["name"] not in absent}
    assert wanted <= policies, policies


@pytest.mark.skipif(not APP_OLD_PASSWORD, reason="no password rotation in this run")
def test_rotated_app_password_replaced_the_old_one(host):
    assert amqp(host, APP_USER, APP_PASSWORD, VHOST, action="open")["ok"] is True
    assert amqp(host, APP_USER, APP_OLD_PASSWORD, VHOST, action="open")["stage"] == "login"


@pytest.mark.skipif(not ADMIN_OLD_PASSWORD, reason="no password rotation in this run")
def test_rotated_admin_password_replaced_the_old_one(host):
    assert http(host, ADMIN, ADMIN_PASSWORD, "/api/whoami")["status"] == 200
    assert http(host, ADMIN, ADMIN_OLD_PASSWORD, "/api/whoami")["status"] == 401


# --- limits that protect the broker (roles/rabbitmq: tasks/limits.yml, tasks/dead_letters.yml) -----

REPO = INVENTORY_VARS.parents[3]


def _role_defaults():
    with open(REPO / "roles/rabbitmq/defaults/main.yml", encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _on_rabbitmq(value):
    """A table value as the inventory gives it for the RabbitMQ broker: the local inventory writes
    RabbitMQ-only values as "{{ N if celery_stack_broker == 'rabbitmq' else 0 }}"."""
    if isinstance(value, str):
        match = re.match(r"^\{\{\s*(\d+)\s+if celery_stack_broker == 'rabbitmq'", value.strip())
        return int(match.group(1)) if match else int(value)
    return value


def _limit(name):
    """A limit as the run set it: the inventory's value, else the role's default."""
    return int(INV.get(name, _role_defaults()[name]))


def _definition(policy):
    definition = policy["definition"]
    return json.loads(definition) if isinstance(definition, str) else definition


def test_routed_queue_policy_carries_the_length_limit(host):
    """The routing table's max_length and overflow are in the queue's one policy, next to its
    dead-letter keys (RabbitMQ applies one policy per queue); a queue without them has none."""
    policies = {p["name"]: p for p in json.loads(host.check_output(
        "rabbitmqctl -q list_policies -p %s --formatter json", VHOST))}
    for queue in INV["celery_stack_queues"]:
        definition = _definition(policies[f"celery-stack-dead-letter-{queue['name']}"])
        assert definition["dead-letter-exchange"] == "celery-stack.dead-letter", definition
        if _on_rabbitmq(queue.get("max_length")):
            assert definition["max-length"] == _on_rabbitmq(queue["max_length"]), definition
            assert definition["overflow"] == queue.get("overflow", "reject-publish"), definition
        else:
            assert "max-length" not in definition and "overflow" not in definition, definition
    # ... and the broker applies it to the queue itself.
    queues = {q["name"]: q for q in json.loads(host.check_output(
        "rabbitmqctl -q list_queues -p %s name policy --formatter json", VHOST))}
    limited = [q["name"] for q in INV["celery_stack_queues"] if _on_rabbitmq(q.get("max_length"))]
    for name in limited:
        assert queues[name]["policy"] == f"celery-stack-dead-letter-{name}", queues[name]


def test_vhost_and_user_limits_are_on_the_broker(host):
    """The limits of the inventory (or the role's defaults) are on the broker, also after a
    console session cleared or changed them (molecule/default/side_effect.yml)."""
    vhost = json.loads(host.check_output("rabbitmqctl -q list_vhost_limits -p %s", VHOST) or "{}")
    assert vhost == {"max-connections": _limit("rabbitmq_vhost_max_connections"),
                     "max-queues": _limit("rabbitmq_vhost_max_queues")}, vhost
    user = json.loads(host.check_output("rabbitmqctl -q list_user_limits --user %s", APP_USER) or "{}")
    assert user == {"max-connections": _limit("rabbitmq_app_user_max_connections"),
                    "max-channels": _limit("rabbitmq_app_user_max_channels")}, user


def test_user_over_its_connection_limit_is_refused(host):
    """What a user limit does: a throwaway user whose limit is reached is refused at connection.open
    (530 NOT_ALLOWED) while its password and permissions are right."""
    user, password = "limits-test", "limits-test-secret"
    host.check_output("rabbitmqctl -q add_user %s %s", user, password)
    try:
        host.check_output("rabbitmqctl -q set_permissions -p %s %s '^$' '^$' '^$'", VHOST, user)
        assert amqp(host, user, password, VHOST, action="open")["ok"] is True
        host.check_output("rabbitmqctl -q set_user_limits %s %s", user, '{"max-connections": 0}')
        refused = amqp(host, user, password, VHOST, action="open")
        assert refused["ok"] is False and refused["stage"] == "vhost", refused
        assert refused["detail"].startswith("530"), refused
    finally:
        host.run("rabbitmqctl -q delete_user %s", user)


# The account the workers and beat run as (roles/celery_app: celery_app_user).
SERVICE_USER = os.environ.get("CELERY_STACK_SERVICE_USER", "celery")

# argv: none. Prints {unit: [client port, ...]}: the TCP connections to the broker's AMQP ports
# (5672, 5671) of every process on this host, by the systemd unit the process runs in.
CLIENTS_BY_UNIT = r'''
import json, os, re
inodes = {}
for name in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        lines = open(name).read().splitlines()[1:]
    except OSError:
        continue
    for line in lines:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        if state == "01" and int(remote.split(":")[1], 16) in (5672, 5671):
            inodes[inode] = int(local.split(":")[1], 16)
found = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        links = [os.readlink("/proc/%s/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%s/fd" % pid)]
        cgroup = open("/proc/%s/cgroup" % pid).read()
    except OSError:
        continue
    unit = (re.findall(r"([^/]+\.service)", cgroup) or ["?"])[-1]
    for link in links:
        match = re.match(r"socket:\[(\d+)\]", link)
        if match and match.group(1) in inodes:
            found.setdefault(unit, []).append(inodes[match.group(1)])
print(json.dumps(found))
'''


def test_broker_use_per_worker_instance(host):
    """What each unit of the stack holds on the broker (connections and their channels), measured
    here: never more than the preflight counts per worker instance, beat or Flower
    (celery_stack.core.broker_use). Recorded in .cache/broker-use.json for docs/monitoring.md.
    Measured where the units run next to the broker (the all-in-one host of the default scenario):
    a broker of the cluster scenario has no worker, no account of theirs, nothing to measure."""
    if "celery_workers" not in host.ansible.get_variables().get("group_names", []):
        pytest.skip("not a worker host: the units are measured on the all-in-one host")
    import sys
    sys.path.insert(0, str(REPO / "collections"))
    from ansible_collections.celery_stack.core.plugins.filter import stack_rules

    connections = json.loads(host.check_output(
        "rabbitmqctl -q list_connections pid user peer_port channels --formatter json"))
    by_port = {c["peer_port"]: c for c in connections if c["user"] == APP_USER}
    # As the units' own user: root in the container lacks CAP_SYS_PTRACE, without which another
    # user's /proc/PID/fd cannot be read.
    units = json.loads(host.check_output("runuser -u %s -- python3 -c %s", SERVICE_USER, CLIENTS_BY_UNIT))
    use = {}
    for unit, ports in units.items():
        # a prefork child inherits its parent's sockets: one connection, however many processes hold it
        held = [by_port[p] for p in set(ports) if p in by_port]
        if held:
            use[unit] = {"connections": len(held), "channels": sum(int(c["channels"]) for c in held)}
    queues = json.loads(host.check_output("rabbitmqctl -q list_queues -p %s name --formatter json", VHOST))
    record = {"units": use, "app_user_connections": len(by_port),
              "unattributed": len(by_port) - sum(held["connections"] for held in use.values()), "queues": len(queues),
              "queue_names": sorted(q["name"] for q in queues)}
    out = REPO / ".cache/broker-use.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=1, sort_keys=True))
    assert any(unit.startswith("celery-worker@") for unit in use), record
    for unit, held in use.items():
        per = (stack_rules.BROKER_USE_PER_INSTANCE if unit.startswith("celery-worker@")
               else stack_rules.BROKER_USE_PER_EXTRA)
        assert held["connections"] <= per["connections"] and held["channels"] <= per["channels"], (unit, record)
