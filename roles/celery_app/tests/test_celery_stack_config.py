"""Unit tests of the settings module every host imports (files/etc/celery-stack/python/), with
real Celery and kombu: run by `make test` (test.sh unit). The JSON beside the module is the one
the role writes, built here by the same filter (celery_stack.core.celery_settings)."""

import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from celery import Celery

ROLE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROLE.parents[1] / "collections"))

from ansible_collections.celery_stack.core.plugins.filter import routing  # noqa: E402

TABLE = [
    {"name": "io", "tasks": ["acme.tasks.crawl*"]},
    {"name": "cpu", "tasks": ["acme.tasks.run_add", "acme.tasks.cpu_*"], "queue_type": "classic"},
]


@pytest.fixture
def deployed(tmp_path, monkeypatch):
    """Install the module and its JSON in a temporary directory, as the role does on a host."""

    def install(declare=True, secrets=None, quorum=True, extra=None, broker="rabbitmq"):
        python = tmp_path / "python"
        python.mkdir(exist_ok=True)
        for name in ("celery_stack_config.py", "celery_stack_app.py", "celery_stack_results.py"):
            shutil.copy(ROLE / "files/etc/celery-stack/python" / name, python / name)
        table = routing.routing_table(TABLE, "rabbitmq", quorum)
        settings = routing.celery_settings(table, "", "rabbitmq", {"task_acks_late": True, **(extra or {})})
        (python / "celery_stack_config.json").write_text(json.dumps({
            "app_module": "acme_app:app",
            "broker_type": broker,
            "table": table,
            "secrets_file": str(tmp_path / "celery.env"),
            "declare_queues": declare,
            "secrets": secrets if secrets is not None else {"broker_url": "CELERY_STACK_BROKER_URL",
                                                             "result_backend": "CELERY_STACK_RESULT_BACKEND"},
            "settings": settings,
        }))
        (tmp_path / "acme_app.py").write_text("from celery import Celery\napp = Celery('acme', broker='memory://')\n"
                                              "app.conf.task_acks_late = False\napp.conf.result_expires = 60\n")
        monkeypatch.syspath_prepend(str(python))
        monkeypatch.syspath_prepend(str(tmp_path))
        for module in ("celery_stack_config", "celery_stack_app", "celery_stack_results", "acme_app"):
            sys.modules.pop(module, None)
        return importlib.import_module("celery_stack_config")

    return install


def test_routes_queues_and_reliability_win_over_the_apps_own(deployed, monkeypatch):
    monkeypatch.setenv("CELERY_STACK_BROKER_URL", "amqp://u:p@mq1:5672/celery;amqp://u:p@mq2:5672/celery")
    monkeypatch.setenv("CELERY_STACK_RESULT_BACKEND", "redis://r:s@redis1:6379/0")
    config = deployed()
    app = config.apply(Celery("acme", set_as_current=False))
    router = app.amqp.router
    assert router.route({}, "acme.tasks.crawl_page")["queue"].name == "io"
    assert router.route({}, "acme.tasks.run_add")["queue"].name == "cpu"
    # unrouted tasks go to the table's default queue (one a worker consumes), never to `celery`
    assert router.route({}, "acme.tasks.other")["queue"].name == "io"
    io = app.amqp.queues["io"]
    assert io.queue_arguments == {"x-queue-type": "quorum"} and io.exchange.type == "topic"
    assert app.amqp.queues["cpu"].queue_arguments == {"x-queue-type": "classic"}
    assert app.conf.broker_transport_options == {"confirm_publish": True}
    assert app.conf.task_acks_late is True
    assert app.conf.broker_url.startswith("amqp://u:p@mq1") and app.conf.result_backend.startswith("redis://")
    assert not io.no_declare
    assert [entry["name"] for entry in config.ROUTING_TABLE] == ["io", "cpu"] and config.DEFAULT_QUEUE == "io"


@pytest.mark.parametrize("url", ["redis://r:s@redis1:6379/0", "rediss://r:s@redis1:6379/0"])
def test_a_redis_result_backend_is_the_deployments(deployed, monkeypatch, url):
    """Celery's Redis backend with celery_stack_results' consumer (a lost notification re-read),
    chosen by the URL's scheme; the result_backend setting stays as the deployment wrote it."""
    from celery.app import backends
    from celery.backends.redis import RedisBackend, ResultConsumer

    monkeypatch.setenv("CELERY_STACK_BROKER_URL", "amqp://u:p@mq1:5672/celery")
    monkeypatch.setenv("CELERY_STACK_RESULT_BACKEND", url)
    app = deployed().apply(Celery("acme", set_as_current=False))
    backend, backend_url = backends.by_url(app.conf.result_backend, app.loader)
    assert backend.__module__ == "celery_stack_results" and issubclass(backend, RedisBackend)
    assert issubclass(backend.ResultConsumer, ResultConsumer) and backend_url == url == app.conf.result_backend
    # another app of the process keeps Celery's own
    assert backends.by_url(url, Celery("other", set_as_current=False).loader)[0] is RedisBackend


def test_the_wrapper_keeps_what_the_deployment_does_not_set(deployed, monkeypatch):
    monkeypatch.setenv("CELERY_STACK_BROKER_URL", "amqp://u:p@mq1:5672/celery")
    monkeypatch.setenv("CELERY_STACK_RESULT_BACKEND", "redis://r:s@redis1:6379/0")
    deployed()
    wrapper = importlib.import_module("celery_stack_app")
    assert wrapper.app.main == "acme"
    assert wrapper.app.conf.task_acks_late is True      # the deployment's value wins
    assert wrapper.app.conf.result_expires == 60         # the app's own stays


def test_producer_hosts_never_declare(deployed, monkeypatch):
    monkeypatch.setenv("CELERY_STACK_BROKER_URL", "amqp://p:q@mq1:5672/celery")
    config = deployed(declare=False, secrets={"broker_url": "CELERY_STACK_BROKER_URL"})
    app = config.apply(Celery("web", set_as_current=False))
    queue = app.amqp.queues["io"]
    assert queue.no_declare and queue.exchange.no_declare
    # result backend "app": the deployment leaves the application's own setting alone
    assert "result_backend" not in config.settings()


def test_secrets_from_the_environment_file(deployed, monkeypatch, tmp_path):
    monkeypatch.delenv("CELERY_STACK_BROKER_URL", raising=False)
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    config = deployed(secrets={"broker_url": "CELERY_STACK_BROKER_URL"})
    (tmp_path / "celery.env").write_text('# comment\nCELERY_STACK_BROKER_URL="amqp://u:p%22q@mq1:5672/celery"\n'
                                         'DJANGO_SETTINGS_MODULE="mysite.settings"\nQUOTED="a\\"b\\\\c"\n')
    assert config.settings()["broker_url"] == "amqp://u:p%22q@mq1:5672/celery"
    assert config.read_environment_file()["QUOTED"] == 'a"b\\c'
    config.load_environment()
    assert os.environ["DJANGO_SETTINGS_MODULE"] == "mysite.settings"


def test_a_missing_secret_names_the_variable_and_the_file(deployed, monkeypatch):
    monkeypatch.delenv("CELERY_STACK_BROKER_URL", raising=False)
    config = deployed(secrets={"broker_url": "CELERY_STACK_BROKER_URL"})
    with pytest.raises(RuntimeError, match="CELERY_STACK_BROKER_URL is not set.*celery.env"):
        config.settings()


def test_extra_settings_win(deployed, monkeypatch):
    monkeypatch.setenv("CELERY_STACK_BROKER_URL", "amqp://u:p@mq1:5672/celery")
    config = deployed(secrets={"broker_url": "CELERY_STACK_BROKER_URL"}, extra={"worker_send_task_events": True})
    assert config.settings()["worker_send_task_events"] is True


def test_every_generated_setting_is_one_celery_knows(deployed, monkeypatch):
    """A misspelt setting would be stored and silently ignored by Celery. Known: declared in
    Celery's defaults, or read by name by its Redis result backend (which reads some, such as
    redis_backend_health_check_interval, without declaring them), or the deployment's own
    (celery_stack_*), read by name by celery_stack_worker."""
    from celery.app.defaults import NAMESPACES, flatten

    redis_backend = (Path(importlib.util.find_spec("celery").origin).parent / "backends" / "redis.py").read_text()
    known = {name for name, _ in flatten(NAMESPACES)}
    known |= set(re.findall(r"_get\('(\w+)'\)", redis_backend))
    monkeypatch.setenv("CELERY_STACK_BROKER_URL", "amqp://u:p@mq1:5672/celery")
    monkeypatch.setenv("CELERY_STACK_RESULT_BACKEND", "redis://r:s@redis1:6379/0")
    monkeypatch.setenv("CELERY_POOL", "threads")
    config = deployed()
    worker = (Path(__file__).parents[1] / "files/etc/celery-stack/python/celery_stack_worker.py").read_text()
    known |= set(re.findall(r'"(celery_stack_\w+)"', worker))
    assert set(config.settings()) - known == set()
    assert config.settings()["result_backend_always_retry"] is True
    assert config.settings()["redis_backend_health_check_interval"] > 0


@pytest.mark.parametrize("pool, cancels", [("prefork", True), ("threads", False), (None, None)])
def test_only_prefork_workers_cancel_running_tasks_on_a_lost_connection(deployed, monkeypatch, pool, cancels):
    """The threads pool cannot cancel a task (no kill_job); producers and beat (no CELERY_POOL)
    keep Celery's own value."""
    monkeypatch.setenv("CELERY_STACK_BROKER_URL", "amqp://u:p@mq1:5672/celery")
    if pool:
        monkeypatch.setenv("CELERY_POOL", pool)
    else:
        monkeypatch.delenv("CELERY_POOL", raising=False)
    config = deployed(secrets={"broker_url": "CELERY_STACK_BROKER_URL"})
    app = config.apply(Celery("acme", set_as_current=False))
    setting = "worker_cancel_long_running_tasks_on_connection_loss"
    assert config.settings().get(setting) is cancels
    if pool == "threads":
        from celery.concurrency import get_implementation
        from celery.concurrency.base import BasePool

        # why: the threads pool still has only the base pool's terminate_job, which raises
        # NotImplementedError (revisit POOL_SETTINGS when Celery implements it)
        assert get_implementation("threads").terminate_job is BasePool.terminate_job
    assert app.conf[setting] is (cancels if cancels is not None else False)


@pytest.mark.parametrize("broker, stamped", [("rabbitmq", True), ("redis", False)])
def test_task_messages_carry_the_time_they_were_sent_on_rabbitmq(deployed, monkeypatch, broker, stamped):
    """RabbitMQ tells the age of a queue's oldest task only from the AMQP timestamp."""
    import time

    import amqp
    from celery import signals

    signals.before_task_publish.disconnect(dispatch_uid="celery_stack_config.stamp_publish_time")
    module = deployed(broker=broker)
    monkeypatch.setenv("CELERY_STACK_BROKER_URL", "memory://")
    monkeypatch.setenv("CELERY_STACK_RESULT_BACKEND", "cache+memory://")
    app = module.apply(Celery("acme"))
    seen = []

    def record(properties=None, **_):
        seen.append(dict(properties))

    signals.before_task_publish.connect(record, weak=False)
    try:
        before = int(time.time())
        app.send_task("acme.tasks.crawl_page", args=[1])
    finally:
        signals.before_task_publish.disconnect(record)
        signals.before_task_publish.disconnect(dispatch_uid="celery_stack_config.stamp_publish_time")
    assert len(seen) == 1
    if stamped:
        assert before <= seen[0]["timestamp"] <= time.time()
        # as py-amqp writes it on the wire to RabbitMQ
        assert amqp.Message(b"{}", timestamp=seen[0]["timestamp"])._serialize_properties()
    else:
        assert "timestamp" not in seen[0]
