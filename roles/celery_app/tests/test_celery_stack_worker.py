"""Unit tests of the workers' module (files/etc/celery-stack/python/celery_stack_worker.py) with
real Celery and kombu: the events connection without publisher confirms, the watchdog's
keep-alives over a real datagram socket, the progress file. Its behaviour on a worker (no
deadlock under a burst, a blocked worker restarted by systemd) is tested in the cluster scenario
(molecule/cluster/tests/test_load.py, test_health.py). Run by `make test` (test.sh unit)."""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
from celery import Celery
from celery.worker import state

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "files/etc/celery-stack/python"))

import celery_stack_worker as worker


def test_events_connection_has_no_publisher_confirms_and_keeps_the_other_options():
    app = Celery("t", broker="amqp://u:p@mq1:5672/v")
    app.conf.broker_transport_options = {"confirm_publish": True, "max_retries": 3}
    consumer = worker.Consumer.__new__(worker.Consumer)
    consumer.app, consumer.ensure_connected = app, (lambda conn: conn)
    events = consumer.connection_for_write(heartbeat=10)
    assert events.transport_options == {"confirm_publish": False, "max_retries": 3}
    assert events.heartbeat == 10
    # every other connection of the app (task publishing) keeps the confirms
    assert app.connection_for_write().transport_options["confirm_publish"] is True


def test_the_consumer_runs_celerys_own_steps_and_the_deployments():
    steps = worker.Consumer.Blueprint.default_steps
    assert steps[-3:] == ("celery_stack_worker:Watchdog", "celery_stack_worker:DeadLetters",
                          "celery_stack_worker:ProducerControl")
    assert list(steps[:-3]) == list(worker.consumer.Consumer.Blueprint.default_steps)
    # the deployment's settings name this consumer for every worker pool
    config = (Path(worker.__file__).with_name("celery_stack_config.py")).read_text()
    assert '"worker_consumer": "celery_stack_worker:Consumer"' in config


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def test_notify_sends_one_datagram_to_systemds_socket(notify_socket, monkeypatch):
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert worker.notify("WATCHDOG=1")
    assert sock.recv(64) == b"WATCHDOG=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert worker.notify("WATCHDOG=1") is False


def test_watchdog_interval_is_a_quarter_of_watchdogsec_for_the_main_process_only():
    assert worker.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert worker.watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 15.0
    assert worker.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None
    assert worker.watchdog_interval({}) is None


def test_liveness_fails_when_the_loop_stops_ticking_but_not_while_reconnecting():
    now = [100.0]
    liveness = worker.Liveness(5.0, clock=lambda: now[0])
    now[0] = 109.0
    assert liveness.alive()
    liveness.tick()
    assert liveness.longest_delay == 4.0  # 9 s between ticks every 5 s: the loop ran 4 s late
    now[0] = 120.0
    assert not liveness.alive()
    assert liveness.alive(consuming=False)  # the consumer is connecting again: no verdict
    liveness.tick()
    assert liveness.alive()


class _Timer:
    def __init__(self):
        self.entries = []

    def call_repeatedly(self, interval, callback):
        self.entries.append((interval, callback))
        return len(self.entries)

    def cancel(self, entry):
        self.entries[entry - 1] = None


class _Consumer:
    def __init__(self, hub=True):
        self.hub = object() if hub else None
        self.timer = _Timer()


def test_watchdog_step_says_ready_feeds_the_watchdog_while_the_loop_ticks(notify_socket, monkeypatch, tmp_path):
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # keep-alive every 50 ms
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    c = _Consumer()
    step = worker.Watchdog(c)
    step.start(c)
    try:
        assert sock.recv(64) == b"READY=1\nSTATUS=consuming"
        assert c.timer.entries[0][0] == 0.05  # the loop's tick, on the loop's own timer
        assert sock.recv(64) == b"WATCHDOG=1"
        progress = json.loads((tmp_path / "progress.json").read_text())
        assert progress["pid"] == os.getpid() and progress["completed"] == state.all_total_count[0]
        assert progress["loop_delay"] >= 0
        # the loop stops ticking (the timer entry is never fired here): the keep-alives stop
        step.liveness.last_tick -= 10
        while True:  # drain what was sent before the last tick went stale
            try:
                sock.settimeout(0.3)
                assert sock.recv(64) == b"WATCHDOG=1"
            except TimeoutError:
                break
        step.stop(c)  # a lost broker connection: keep-alives again, no verdict
        sock.settimeout(2)
        assert sock.recv(64) == b"WATCHDOG=1"
    finally:
        step.shutdown(c)
    messages = []
    sock.settimeout(0.3)
    try:
        while True:
            messages.append(sock.recv(64))
    except TimeoutError:
        pass
    assert b"STOPPING=1" in messages


def test_without_a_watchdog_the_step_only_writes_progress(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    step = worker.Watchdog(_Consumer(hub=False))
    assert step.watchdog is None and step.interval == worker.Watchdog.PROGRESS_INTERVAL
    written = worker.write_progress(str(tmp_path))
    assert json.loads(Path(written).read_text())["active"] == len(state.active_requests)
    assert not (tmp_path / "progress.json.partial").exists()
