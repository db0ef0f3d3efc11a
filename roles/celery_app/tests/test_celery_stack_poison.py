"""Unit tests of the poison-task handling (celery_stack_worker.py, section "Poison tasks") and
of the replay tool (celery_stack_dead_letters.py), with real Celery and kombu (memory transport)."""

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery import Celery
from kombu import Connection, Exchange, Queue

PYTHON = Path(__file__).resolve().parents[1] / "files/etc/celery-stack/python"
sys.path.insert(0, str(PYTHON))
worker = importlib.import_module("celery_stack_worker")
dead_letters = importlib.import_module("celery_stack_dead_letters")


def test_verdict_counts_up_to_the_limit():
    assert [worker.verdict(died, 3) for died in (1, 2, 3, 4)] == ["redeliver", "redeliver", "dead-letter", "dead-letter"]
    assert worker.verdict(1, 0) == "celery"  # 0: Celery's own behaviour
    assert worker.verdict(1, 1) == "dead-letter"


def test_deaths_header():
    assert worker.deaths({}) == 0 and worker.deaths(None) == 0
    assert worker.deaths({worker.DEATHS_HEADER: 2}) == 2
    assert worker.deaths({worker.DEATHS_HEADER: "junk"}) == 0


def _message(headers=None, exchange="cpu", routing_key="cpu", **properties):
    return SimpleNamespace(body=b'[[1], {}, {}]', content_type="application/json", content_encoding="utf-8",
                           headers={"id": "abc", "task": "t", **(headers or {})},
                           properties={"delivery_mode": 2, "priority": 0, "correlation_id": "abc",
                                       "user_id": "celery", **properties},
                           delivery_info={"exchange": exchange, "routing_key": routing_key})


def test_redelivery_is_the_same_message_with_one_more_death():
    copy = worker.redelivery(_message({"x-delivery-count": 4, worker.DEATHS_HEADER: 1}), 2)
    assert copy["body"] == b'[[1], {}, {}]' and copy["content_type"] == "application/json"
    assert copy["exchange"] == "cpu" and copy["routing_key"] == "cpu"
    assert copy["headers"] == {"id": "abc", "task": "t", worker.DEATHS_HEADER: 2}  # no broker header
    assert copy["delivery_mode"] == 2 and copy["correlation_id"] == "abc"
    assert "user_id" not in copy  # RabbitMQ checks it against the publishing user


def test_redelivery_of_a_delayed_message_goes_straight_to_its_queue():
    key = ".".join("0" * 27 + "1") + ".cpu"
    copy = worker.redelivery(_message(exchange="celery_delayed_27", routing_key=key), 1)
    assert copy["exchange"] == "" and copy["routing_key"] == "cpu"
    assert worker.queue_of({"routing_key": key}) == "cpu" and worker.queue_of({"routing_key": "a.b"}) == "a.b"


def test_install_request_keeps_a_custom_request():
    app = Celery("t", set_as_current=False)

    @app.task
    def plain():
        pass

    @app.task(Request="mymodule:MyRequest")
    def custom():
        pass

    changed = worker.install_request(app)
    assert plain.name in changed and custom.name not in changed
    assert plain.Request == worker.REQUEST and custom.Request == "mymodule:MyRequest"
    assert worker.install_request(app) == []  # idempotent


def test_dead_letter_entities():
    exchange, queues = worker.dead_letter_entities({"io": "quorum", "cpu": "classic", "legacy": None})
    assert exchange.name == "celery-stack.dead-letter" and exchange.type == "direct"
    # each of its routed queue's type: replicated where the queue is
    assert [(q.name, q.routing_key, q.queue_arguments) for q in queues] == [
        ("io.dead-letter", "io", {"x-queue-type": "quorum", "x-delivery-limit": worker.DEAD_LETTER_DELIVERY_LIMIT}),
        ("cpu.dead-letter", "cpu", {"x-queue-type": "classic"}),
        ("legacy.dead-letter", "legacy", {"x-queue-type": "classic"})]


def _lost():
    try:
        raise WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL).")
    except WorkerLostError:
        return ExceptionInfo(internal=True)


@pytest.fixture
def request_for():
    """A Request of the deployment for one delivered message, its ack/reject/publish recorded."""

    def make(deaths=0, limit=3):
        app = Celery("t", broker="memory://", backend="cache+memory://", set_as_current=False)
        app.conf.update({worker.LIMIT_SETTING: limit, "task_acks_late": True, "task_reject_on_worker_lost": True})

        @app.task
        def poison():
            pass

        message = mock.Mock(**{"headers": {"id": "abc", "task": poison.name, worker.DEATHS_HEADER: deaths},
                               "properties": {"delivery_mode": 2}, "body": b"[[], {}, {}]",
                               "content_type": "application/json", "content_encoding": "utf-8",
                               "delivery_info": {"exchange": "cpu", "routing_key": "cpu"}, "payload": ([], {}, {})})
        req = worker.Request(message, app=app, task=poison, on_ack=mock.Mock(), on_reject=mock.Mock(),
                             hostname="cpu-prefork@h")
        producer = mock.MagicMock()
        app.producer_or_acquire = mock.MagicMock()
        app.producer_or_acquire.return_value.__enter__.return_value = producer
        return req, producer

    return make


def test_a_death_below_the_limit_republishes_then_acks(request_for):
    req, producer = request_for(deaths=1)
    req.on_failure(_lost())
    kwargs = producer.publish.call_args.kwargs
    assert kwargs["headers"][worker.DEATHS_HEADER] == 2 and kwargs["routing_key"] == "cpu"
    req.on_ack.assert_called_once()
    req.on_reject.assert_not_called()
    assert req.task.backend.get_state(req.id) == "PENDING"


def test_the_death_at_the_limit_records_failure_and_dead_letters(request_for):
    req, producer = request_for(deaths=2)
    req.on_failure(_lost())
    producer.publish.assert_not_called()
    req.on_reject.assert_called_once()
    assert req.on_reject.call_args.args[2] is False  # requeue=False: RabbitMQ dead-letters it
    meta = req.task.backend.get_task_meta(req.id)
    assert meta["status"] == "FAILURE"
    assert "3 times" in str(meta["result"]) and "cpu.dead-letter" in str(meta["result"])


def test_limit_zero_is_celerys_requeue(request_for):
    req, producer = request_for(deaths=5, limit=0)
    req.on_failure(_lost())
    producer.publish.assert_not_called()
    assert req.on_reject.call_args.args[2] is True  # Celery: requeue


def test_a_failed_republish_falls_back_to_celerys_requeue(request_for):
    req, producer = request_for(deaths=0)
    producer.publish.side_effect = OSError("broker away")
    req.on_failure(_lost())
    req.on_ack.assert_not_called()
    assert req.on_reject.call_args.args[2] is True


def test_list_and_replay_with_the_memory_transport(capsys):
    connection = Connection("memory://")
    dlx = Exchange("celery-stack.dead-letter", type="direct")
    dlq = Queue("cpu.dead-letter", dlx, routing_key="cpu")
    target = Queue("cpu", Exchange("cpu", type="topic"), routing_key="cpu")
    with connection.Producer() as producer:
        for task_id in ("one", "two"):
            producer.publish({"n": task_id}, exchange=dlx, routing_key="cpu", declare=[dlq, target],
                             headers={"id": task_id, "task": "t", worker.DEATHS_HEADER: 3,
                                      "x-death": [{"reason": "rejected", "queue": "cpu", "count": 1}]})
    assert dead_letters.main(["list", "cpu", "--json"], connection=Connection("memory://")) == 0
    assert [line.count('"earlier_deaths": 3') for line in capsys.readouterr().out.splitlines()] == [1, 1]
    dead_letters.main(["replay", "cpu", "--id", "two"], connection=Connection("memory://"))
    with Connection("memory://") as check:
        channel = check.channel()
        replayed = channel.basic_get("cpu")
        assert replayed.headers["id"] == "two" and worker.DEATHS_HEADER not in replayed.headers
        assert channel.basic_get("cpu") is None
        left = channel.basic_get("cpu.dead-letter")
        assert left.headers["id"] == "one"


def test_replay_needs_a_choice():
    with pytest.raises(SystemExit):
        dead_letters.main(["replay", "cpu"], connection=Connection("memory://"))
