"""Behaviour of the redis role: hardened server, default user off, least-privilege Celery users.

Runs against every host of the `redis` group (molecule verify) or any host given with
--hosts. Credentials come from the local inventory (inventories/local/group_vars/all), the
values the scenario converges with.

The Celery tests use a real Celery 5.7 + redis-py client on the Redis host: the worker venv of the
celery_app role (/opt/celery-stack/venv, present in the all-in-one scenario) or the python
named by REDIS_TEST_CELERY_PYTHON. A missing client FAILS the test (no silent skip).
"""

import json
import os
import pathlib
import shlex
import textwrap
import uuid

import pytest
import yaml
from deployed_tls import tls_ca

REPO = pathlib.Path(__file__).resolve().parents[3]
INVENTORY_VARS = REPO / "inventories" / "local" / "group_vars" / "all"
CELERY_PYTHON = os.environ.get("REDIS_TEST_CELERY_PYTHON", "/opt/celery-stack/venv/bin/python")
# Written by the scenario's side-effect step (see test_acl_change_applied_without_restart).
SIDE_EFFECT_RECORD = "/var/lib/celery-stack-test/redis-acl-change.json"
ACL_CHANGE_USER = "acl-change-probe"


def _inventory():
    values = {}
    for path in sorted(INVENTORY_VARS.glob("*.yml")):
        values.update(yaml.safe_load(path.read_text()) or {})
    return values


VARS = _inventory()
PORT = int(VARS.get("redis_port", 6379))
ADMIN = (VARS.get("redis_admin_user", "admin"), VARS["redis_admin_password"])
RESULTS = (VARS["celery_stack_redis_results_user"], VARS["celery_stack_redis_results_password"])
BROKER = (VARS["celery_stack_redis_broker_user"], VARS["celery_stack_redis_broker_password"])
SECRETS = [ADMIN[1], RESULTS[1], BROKER[1]]

testinfra_hosts = ["ansible://redis"] if os.environ.get("MOLECULE_INVENTORY_FILE") else []


def cli(host, *args, user=None, password=None):
    """Run redis-cli as USER (None: unauthenticated); the password travels in the environment."""
    env = f"REDISCLI_AUTH={shlex.quote(password)} " if password is not None else ""
    auth = f"--user {shlex.quote(user)} " if user is not None else ""
    tls = f"--tls --cacert {tls_ca(host)} " if tls_ca(host) else ""
    cmd = f"{env}redis-cli --no-auth-warning {tls}-h 127.0.0.1 -p {PORT} {auth}" + " ".join(
        shlex.quote(a) for a in args)
    return host.run(cmd)


def admin(host, *args):
    result = cli(host, *args, user=ADMIN[0], password=ADMIN[1])
    assert result.rc == 0, result.stderr
    return result.stdout.strip()


def server_identity(host):
    info = dict(line.split(":", 1) for line in admin(host, "INFO", "server").splitlines()
                if ":" in line)
    return info["run_id"].strip(), int(info["process_id"])


def celery_python(host):
    if not host.file(CELERY_PYTHON).exists:
        pytest.fail(f"No Celery client on the Redis host: {CELERY_PYTHON} is missing. The "
                    "all-in-one scenario gets it from the celery_app role; elsewhere set "
                    "REDIS_TEST_CELERY_PYTHON to a python with celery[redis] 5.7.")
    return CELERY_PYTHON


# A minimal Celery app, written to the host for the round trips.
APP = textwrap.dedent('''\
    import os
    from celery import Celery

    app = Celery("redisprobe", broker=os.environ["PROBE_BROKER"],
                 backend=os.environ["PROBE_BACKEND"])
    app.conf.update(broker_connection_retry_on_startup=True, task_default_queue="celery",
                    result_expires=600, worker_hijack_root_logger=False,
                    worker_send_task_events=True, task_send_sent_event=True)


    @app.task
    def add(x, y):
        return x + y


    @app.task
    def tsum(values):
        return sum(values)
    ''')


def write_app(host):
    workdir = f"/var/tmp/redis-test-{uuid.uuid4().hex[:8]}"
    host.run(f"mkdir -p {workdir}")
    host.run(f"cat > {workdir}/redisprobe.py <<'EOF'\n{APP}EOF")
    return workdir


def url(host, user_password, db=0):
    """A Celery URL of a Redis user; over TLS when the host has the CA (kombu and Celery's
    backend read the ssl_* query parameters)."""
    if tls_ca(host):
        return (f"rediss://{user_password[0]}:{user_password[1]}@127.0.0.1:{PORT}/{db}"
                f"?ssl_cert_reqs=required&ssl_ca_certs={tls_ca(host)}")
    return f"redis://{user_password[0]}:{user_password[1]}@127.0.0.1:{PORT}/{db}"


def acl_denials(host, usernames):
    """ACL LOG entries (reason, object) of the given users since the last ACL LOG RESET."""
    raw = admin(host, "ACL", "LOG", "128").splitlines()
    denials, entry = [], {}
    # redis-cli prints each entry as alternating field/value lines
    for field, value in zip(raw[0::2], raw[1::2]):
        if field == "count" and entry:
            denials.append(entry)
            entry = {}
        entry[field] = value
    if entry:
        denials.append(entry)
    return [(d.get("username"), d.get("reason"), d.get("object")) for d in denials
            if d.get("username") in usernames]


# ---- the service ---------------------------------------------------------------------------

def test_service_running_without_restart_loop(host):
    service = host.service("redis-server")
    assert service.is_running
    assert service.is_enabled
    # A unit that fails under the sandbox (e.g. PrivateUsers= in a container) loops restarting
    # while systemctl may still show it active for a moment.
    assert host.run("systemctl show -p NRestarts --value redis-server").stdout.strip() == "0"
    assert admin(host, "PING") == "PONG"


def test_configuration_in_force(host):
    config = dict(zip(*[iter(admin(host, "CONFIG", "GET", "*").splitlines())] * 2))
    assert config["protected-mode"] == "yes"
    assert config["maxmemory-policy"] == "noeviction"
    assert int(config["maxmemory"]) > 0
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["aclfile"] == "/etc/redis/users.acl"
    # With TLS (celery_stack_tls) the TLS port is the only one: no plain port, not even on loopback.
    assert (config["port"], config["tls-port"]) == (("0", str(PORT)) if tls_ca(host) else (str(PORT), "0"))


def test_no_plaintext_secret_on_disk(host):
    for path in ("/etc/redis/users.acl", "/etc/redis/redis.conf"):
        content = host.file(path).content_string
        for secret in SECRETS:
            assert secret not in content, f"a plaintext password is in {path}"
    acl = host.file("/etc/redis/users.acl")
    assert (acl.user, acl.group, acl.mode) == ("root", "redis", 0o640)


# ---- who gets in -----------------------------------------------------------------------------

def test_unauthenticated_client_refused(host):
    result = cli(host, "GET", "celery-task-meta-x")
    assert "NOAUTH" in result.stdout + result.stderr


def test_default_user_off(host):
    result = cli(host, "PING", user="default", password="")
    assert "WRONGPASS" in result.stdout + result.stderr
    default = [line for line in admin(host, "ACL", "LIST").splitlines()
               if line.startswith("user default ")]
    assert default and default[0].startswith("user default off ")


@pytest.mark.parametrize("user", [ADMIN[0], RESULTS[0], BROKER[0]])
def test_wrong_password_refused(host, user):
    result = cli(host, "PING", user=user, password="not-the-password-0123456789")
    assert "WRONGPASS" in result.stdout + result.stderr


# ---- the result-backend user -------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["FLUSHALL"],
    ["FLUSHDB"],
    ["CONFIG", "GET", "maxmemory"],
    ["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"],
    ["ACL", "LIST"],
    ["KEYS", "*"],
    ["SET", "outside-pattern", "x"],
    ["GET", "unacked"],
    ["LPUSH", "celery", "x"],
    ["DEL", "_kombu.binding.celery"],
    ["PUBLISH", "/0.celery.pidbox", "x"],
    ["SHUTDOWN"],
    ["EVAL", "return 1", "0"],
    ["SCRIPT", "FLUSH"],
    ["CLIENT", "KILL", "ID", "1"],
])
def test_results_user_refused(host, command):
    result = cli(host, *command, user=RESULTS[0], password=RESULTS[1])
    assert "NOPERM" in result.stdout + result.stderr, result.stdout


@pytest.mark.parametrize("command", [
    ["FLUSHALL"], ["CONFIG", "GET", "*"], ["KEYS", "*"], ["GET", "celery-task-meta-x"],
    ["SET", "outside-pattern", "x"], ["SUBSCRIBE", "celery-task-meta-x"],
])
def test_broker_user_refused(host, command):
    result = cli(host, *command, user=BROKER[0], password=BROKER[1])
    assert "NOPERM" in result.stdout + result.stderr, result.stdout


def test_results_user_stores_and_reads_celery_result(host):
    """celery's Redis backend stores a result, a group result, reads them (GET/MGET and the
    SUBSCRIBE path of AsyncResult.get) and forgets them, as the results user."""
    python = celery_python(host)
    workdir = write_app(host)
    admin(host, "ACL", "LOG", "RESET")
    script = textwrap.dedent('''\
        import json, uuid
        from redisprobe import app
        from celery.result import GroupResult
        tid, gid = str(uuid.uuid4()), str(uuid.uuid4())
        app.backend.store_result(tid, {"answer": 42}, "SUCCESS")
        r = app.AsyncResult(tid)
        got = r.get(timeout=10)
        g = GroupResult(gid, [r]); g.save()
        restored = GroupResult.restore(gid, app=app)
        out = {"got": got, "state": r.state, "restored": [x.id for x in restored.results],
               "many": [m[1]["result"] for m in app.backend.get_many([tid], timeout=10)]}
        r.forget(); g.delete()
        out["after_forget"] = app.AsyncResult(tid).state
        print(json.dumps(out))
        ''')
    result = host.run(
        f"cd {workdir} && PROBE_BROKER=memory:// PROBE_BACKEND={shlex.quote(url(host, RESULTS))} "
        f"timeout 60 {python} -c {shlex.quote(script)}")
    host.run(f"rm -rf {workdir}")
    assert result.rc == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["got"] == {"answer": 42}
    assert out["state"] == "SUCCESS"
    assert len(out["restored"]) == 1
    assert out["many"] == [{"answer": 42}]
    assert out["after_forget"] == "PENDING"
    assert acl_denials(host, [RESULTS[0]]) == []


# ---- the broker user ---------------------------------------------------------------------------

def test_celery_round_trip_with_redis_broker(host):
    """A real worker consumes from Redis as the broker user and stores results as the results
    user: single task, group, chord (native join), countdown, remote control (inspect ping),
    events, warm shutdown. Nothing may be denied on the way (ACL LOG stays empty)."""
    python = celery_python(host)
    celery = str(pathlib.PurePosixPath(python).parent / "celery")
    workdir = write_app(host)
    admin(host, "ACL", "LOG", "RESET")
    client = textwrap.dedent('''\
        import json
        from celery import group, chord
        from redisprobe import app, add, tsum
        out = {"single": add.delay(2, 3).get(timeout=30),
               "group": group(add.s(i, i) for i in range(3))().get(timeout=30),
               "chord": chord([add.s(i, 1) for i in range(3)], tsum.s())().get(timeout=30),
               "countdown": add.apply_async((1, 1), countdown=1).get(timeout=30),
               "ping": bool(app.control.inspect(timeout=5).ping())}
        print(json.dumps(out))
        ''')
    env = (f"PROBE_BROKER={shlex.quote(url(host, BROKER))} "
           f"PROBE_BACKEND={shlex.quote(url(host, RESULTS))}")
    run = textwrap.dedent(f'''\
        cd {workdir}
        export {env}
        timeout 120 {celery} -A redisprobe worker -Q celery -c 2 -n redisprobe@%h \\
            -l warning > worker.log 2>&1 &
        worker=$!
        for _ in $(seq 30); do grep -q ready worker.log 2>/dev/null && break; sleep 1; done
        timeout 90 {python} -c {shlex.quote(client)}; rc=$?
        kill -TERM $worker; wait $worker
        exit $rc
        ''')
    result = host.run(run)
    log = host.run(f"cat {workdir}/worker.log").stdout
    host.run(f"rm -rf {workdir}")
    assert result.rc == 0, result.stderr + log
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"single": 5, "group": [0, 2, 4], "chord": 6, "countdown": 2, "ping": True}
    assert "NoPermissionError" not in log and "NOPERM" not in log
    assert acl_denials(host, [BROKER[0], RESULTS[0]]) == []


# ---- ACL changes: ACL LOAD, no restart, no data lost -------------------------------------------

def test_acl_load_reverts_drift_without_restart(host):
    """The mechanism the role's handler uses (ACL LOAD): a user's rules changed at runtime go
    back to the file's, a user not in the file disappears, the server keeps running (same
    run_id and pid) and keeps its keys."""
    before = server_identity(host)
    key = f"celery-task-meta-acl-load-{uuid.uuid4().hex[:8]}"
    assert cli(host, "SET", key, "kept", user=RESULTS[0], password=RESULTS[1]).stdout.strip() == "OK"
    admin(host, "ACL", "SETUSER", RESULTS[0], "~drift-*")
    admin(host, "ACL", "SETUSER", "drift-user", "on", ">drift-password-123456", "+@all", "~*")
    assert "~drift-*" in admin(host, "ACL", "GETUSER", RESULTS[0])
    assert admin(host, "ACL", "LOAD") == "OK"
    users = admin(host, "ACL", "USERS").splitlines()
    assert "drift-user" not in users
    assert "~drift-*" not in admin(host, "ACL", "GETUSER", RESULTS[0])
    assert server_identity(host) == before
    assert cli(host, "GET", key, user=RESULTS[0], password=RESULTS[1]).stdout.strip() == "kept"
    admin(host, "DEL", key)


def test_acl_change_applied_without_restart(host):
    """Driven by the scenario's side-effect step: it records the server's run_id/pid and writes
    a key, then converges again with one more ACL user (ACL_CHANGE_USER). The change must be
    live, without a restart, with the key still there."""
    record = host.file(SIDE_EFFECT_RECORD)
    if not record.exists:
        if os.environ.get("REDIS_TEST_WITHOUT_SIDE_EFFECT"):
            pytest.skip("REDIS_TEST_WITHOUT_SIDE_EFFECT set: no ACL-change step in this run")
        pytest.fail(f"{SIDE_EFFECT_RECORD} is missing: the scenario's side-effect step (ACL "
                    "change by a second converge) did not run")
    before = json.loads(record.content_string)
    run_id, pid = server_identity(host)
    assert (run_id, pid) == (before["run_id"], before["process_id"]), "redis-server restarted"
    assert admin(host, "GET", before["key"]) == before["value"]
    rules = admin(host, "ACL", "LIST")
    line = next(line for line in rules.splitlines() if line.startswith(f"user {ACL_CHANGE_USER} "))
    assert " on " in line and "~acl-change-probe-*" in line
