# Managed by Ansible (role celery_app of celery-stack): local changes are overwritten.
"""The Celery settings of the celery-stack deployment, for every process of the application.

One line applies them to a Celery app, on a worker host or a producer host (a web process that
only sends tasks)::

    import celery_stack_config
    celery_stack_config.apply(app)

``apply`` is ``app.conf.update(settings())``: Celery gives ``conf.update`` precedence over the
app's ``config_from_object`` source (also a lazily loaded one, such as Django's settings), so
every setting below wins over the app's own value and every other setting stays as the app sets
it. The workers run ``celery -A celery_stack_app``, a wrapper that loads the app and calls
``apply``; calling it twice changes nothing.

What is applied (written by the deployment next to this file, celery_stack_config.json): the
routes of THE routing table, its queues with their exchange and queue type, the default queue,
the reliability settings (acks, publisher confirms, result-store retries, ...) and any extra
settings of the inventory; on a worker also what its pool needs (POOL_SETTINGS).
No secrets there: the broker and result-backend URLs come from the environment
(CELERY_STACK_BROKER_URL, CELERY_STACK_RESULT_BACKEND), or else from the deployment's
EnvironmentFile, readable by root and the application's group only.
"""

import json
import os
import ssl
import time
from pathlib import Path

from celery import signals
from kombu import Exchange, Queue

DATA_FILE = Path(__file__).with_suffix(".json")
DATA = json.loads(DATA_FILE.read_text(encoding="utf-8"))

APP_MODULE = DATA["app_module"]
SECRETS_FILE = DATA["secrets_file"]
BROKER_TYPE = DATA["broker_type"]
# THE routing table as deployed: per queue its name, task patterns and queue type.
ROUTING_TABLE = DATA["table"]
DEFAULT_QUEUE = DATA["settings"]["task_default_queue"]
# TLS (celery_stack_tls): which connections use it, the CA bundle to check servers against and,
# with celery_stack_tls_client_certificates, the certificate and key the clients show.
TLS = DATA.get("tls") or {}

# What one pool's workers need on top (a worker unit runs with CELERY_POOL=<pool>). On a lost
# broker connection the broker requeues every unacknowledged task, so a worker cancels those it
# is still running rather than have them run twice at once: prefork kills them. The threads
# pool cannot stop a thread (it has no kill_job: Celery would log NotImplementedError at every
# connection loss), so its running tasks finish and may run once more (acks_late: tasks must
# be idempotent). Every worker runs the deployment's consumer (celery_stack_worker.py next to
# this file): events without publisher confirms, systemd's watchdog, progress for the health
# check.
WORKER_SETTINGS = {"worker_consumer": "celery_stack_worker:Consumer"}
POOL_SETTINGS = {
    "prefork": {**WORKER_SETTINGS, "worker_cancel_long_running_tasks_on_connection_loss": True},
    "threads": {**WORKER_SETTINGS, "worker_cancel_long_running_tasks_on_connection_loss": False},
}


def read_environment_file(path=SECRETS_FILE):
    """NAME="value" lines of an EnvironmentFile as systemd reads them (\\" and \\\\ escaped)."""
    values = {}
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
    except OSError:
        return values
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        values[name.strip()] = value
    return values


def load_environment(path=SECRETS_FILE):
    """Put the EnvironmentFile's variables (e.g. DJANGO_SETTINGS_MODULE, the app's own settings)
    into os.environ, where they are not set already: for processes systemd did not start with
    that file, such as a management command run by hand."""
    for name, value in read_environment_file(path).items():
        os.environ.setdefault(name, value)


def _secret(name):
    value = os.environ.get(name) or read_environment_file().get(name)
    if not value:
        raise RuntimeError(
            f"{name} is not set: run under the deployment's systemd units, or as a member of the "
            f"application's group so that {SECRETS_FILE} can be read"
        )
    return value


def _queue(entry, declare):
    # A topic exchange per queue, bound with the queue's name: routes like a direct exchange,
    # and Celery's native delayed delivery (ETA/countdown on quorum queues) needs topic. The type
    # is always explicit on RabbitMQ: a queue declared without one gets the vhost's default type
    # (quorum on RabbitMQ 4.x), which Celery would not know about. Producer-only hosts never
    # declare (their broker user may not): the workers declare the queues, the producers publish.
    # max_priority (x-max-priority) is declared by the workers and known to the producers alike.
    arguments = {"x-queue-type": entry["queue_type"]} if entry["queue_type"] else None
    exchange = Exchange(entry["exchange"], type=entry["exchange_type"], no_declare=not declare)
    return Queue(entry["name"], exchange, routing_key=entry["routing_key"], queue_arguments=arguments,
                 max_priority=entry.get("max_priority"), no_declare=not declare)


def _redis_tls(ca_file, client):
    # redis-py's SSLConnection: the server's certificate checked against the CA bundle, and its
    # name against the host of the URL (redis-py's default for the name check has changed between
    # versions: stated here).
    conf = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": ca_file, "ssl_check_hostname": True}
    if client:
        conf.update(ssl_certfile=client[0], ssl_keyfile=client[1])
    return conf


def tls_settings():
    """Celery's TLS settings for the connections that use TLS: a certificate is required, checked
    against the CA bundle, and must name the host dialled.

    On RabbitMQ, kombu (py-amqp) checks the name only when server_hostname is given; None makes it
    take each broker's host from the URL list (kombu's own documentation). kombu writes that host
    into this dict when it connects and later connections, failovers included, reuse it: every
    broker's certificate therefore also names the other brokers (roles/tls, tls_peer_names).

    With client certificates (celery_stack_tls_client_certificates) each connection also shows
    the host's certificate and key (the application's copies): py-amqp and redis-py load them
    at every new connection, so a renewed pair is used without a restart."""
    conf = {}
    ca_file = TLS.get("ca_file")
    client = (TLS["client_cert"], TLS["client_key"]) if TLS.get("client_cert") else None
    if TLS.get("broker"):
        if BROKER_TYPE == "rabbitmq":
            conf["broker_use_ssl"] = {"ca_certs": ca_file, "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None}
            if client:
                conf["broker_use_ssl"].update(certfile=client[0], keyfile=client[1])
        else:
            conf["broker_use_ssl"] = _redis_tls(ca_file, client)
    if TLS.get("result_backend"):
        conf["redis_backend_use_ssl"] = _redis_tls(ca_file, client)
    return conf


def settings():
    """The deployment's Celery settings, secrets included (they win over the app's own)."""
    conf = dict(DATA["settings"])
    conf["task_queues"] = tuple(_queue(entry, DATA["declare_queues"]) for entry in conf["task_queues"])
    # Exact task names first, then the globs in table order; one queue each.
    conf["task_routes"] = ([(pattern, {"queue": queue}) for pattern, queue in conf["task_routes"]],)
    conf.update(POOL_SETTINGS.get(os.environ.get("CELERY_POOL", ""), {}))
    conf.update(tls_settings())
    for setting, variable in DATA["secrets"].items():
        conf[setting] = _secret(variable)
    return conf


# The deployment's Redis result backend (celery_stack_results.py next to this file: Celery's own,
# with a result's notification that cannot be lost), by the schemes of the result_backend URL.
RESULT_BACKENDS = {"redis": "celery_stack_results:RedisBackend", "rediss": "celery_stack_results:RedisBackend"}


def stamp_publish_time(properties=None, **_):
    """before_task_publish: the AMQP timestamp of every task message, the time it was sent, in
    whole seconds (py-amqp packs the property as an integer: a datetime fails the publish). Celery
    sets none, and RabbitMQ reports the age of a classic queue's oldest ready message
    (head_message_timestamp, which the alert CeleryQueueOldestTask reads) only from it; quorum
    queues report none (RabbitMQ 4.0). A retry is a new message, with a new time."""
    if properties is not None:
        properties.setdefault("timestamp", int(time.time()))


def apply(app):
    """Apply the deployment's settings on top of the application's own configuration."""
    app.conf.update(settings())
    # The loader's own aliases, for this app only (the class attribute is shared by every loader).
    app.loader.override_backends = {**app.loader.override_backends, **RESULT_BACKENDS}
    # On RabbitMQ only: the Redis transport writes the properties as JSON, which has no datetime.
    # Signals are process-wide: dispatch_uid connects it once however many apps apply this.
    if BROKER_TYPE == "rabbitmq":
        signals.before_task_publish.connect(stamp_publish_time, weak=False,
                                            dispatch_uid=__name__ + ".stamp_publish_time")
    return app
