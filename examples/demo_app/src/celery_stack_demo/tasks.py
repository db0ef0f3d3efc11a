"""Demo tasks: the original note's ``run_add``, a crawl-and-store I/O task, a CPU-bound task,
the probes of the fault and load suites (``crawl_probe``, ``cpu_probe``) and a poison task
(``cpu_poison``).

Every task returns evidence of where it ran (the worker node name ``<queue>-<pool>@host``, the
queue it was delivered from, the process id and thread name), so tests can prove that the
routing table sent it to the right queue and pool.
"""

import os
import re
import signal
import sqlite3
import threading
import time
import urllib.request
from datetime import datetime, timezone

from .app import app

# Where the crawl task stores its rows: the worker service's state directory by default.
DB_PATH_ENV = "CELERY_STACK_DEMO_DB"
DEFAULT_DB_PATH = "/var/lib/celery-stack/demo.sqlite3"
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def _where(request):
    """Evidence of the worker, queue and pool that executed the current task."""
    delivery = request.delivery_info or {}
    return {
        "hostname": request.hostname,
        "queue": delivery.get("routing_key"),
        "exchange": delivery.get("exchange"),
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
    }


@app.task(bind=True)
def run_add(self, x, y):
    """Add two numbers (the original note's example task)."""
    return {"result": x + y, **_where(self.request)}


@app.task(bind=True)
def cpu_fib(self, n):
    """CPU-bound: the n-th Fibonacci number, computed naively on purpose."""

    def fib(k):
        return k if k < 2 else fib(k - 1) + fib(k - 2)

    started = time.monotonic()
    value = fib(int(n))
    return {"result": value, "seconds": round(time.monotonic() - started, 3), **_where(self.request)}


def _connect(path):
    db = sqlite3.connect(path, timeout=30)
    db.execute(
        "CREATE TABLE IF NOT EXISTS pages (id INTEGER PRIMARY KEY, url TEXT NOT NULL,"
        " status INTEGER, length INTEGER, title TEXT, fetched_at TEXT NOT NULL)"
    )
    return db


@app.task(bind=True, autoretry_for=(OSError,), retry_backoff=True, max_retries=3)
def crawl_and_store(self, url, timeout=10):
    """I/O-bound: fetch a page and store url, status, length and title in SQLite.

    The workload behind the original incident (web crawling + database storage). The task is
    idempotent enough for ``acks_late``: a redelivery stores one more row, never a wrong one.
    """
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (demo: http only)
        status = response.status
        body = response.read()
    match = _TITLE.search(body)
    title = match.group(1).decode("utf-8", "replace").strip() if match else None
    path = os.environ.get(DB_PATH_ENV, DEFAULT_DB_PATH)
    db = _connect(path)
    try:
        with db:
            cursor = db.execute(
                "INSERT INTO pages (url, status, length, title, fetched_at) VALUES (?, ?, ?, ?, ?)",
                (url, status, len(body), title, datetime.now(timezone.utc).isoformat()),
            )
        row_id = cursor.lastrowid
    finally:
        db.close()
    return {
        "url": url,
        "status": status,
        "length": len(body),
        "title": title,
        "db": path,
        "row_id": row_id,
        **_where(self.request),
    }


# Where crawl_probe records its completions: the worker service's state directory by default.
PROBE_DIR_ENV = "CELERY_STACK_DEMO_PROBE_DIR"
DEFAULT_PROBE_DIR = "/var/lib/celery-stack"


def _log_completion(run, index, hostname):
    path = os.path.join(os.environ.get(PROBE_DIR_ENV, DEFAULT_PROBE_DIR), f"probe-{run}.log")
    # One short write() in append mode: lines of concurrent threads and processes never mix.
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"{int(index)} {hostname} {time.time():.3f}\n")


@app.task(bind=True)
def crawl_probe(self, run, index, seconds):
    """The fault and load suites' I/O task (molecule/shared/faults): waits like a network call
    would (``seconds`` 0: an instant task), then appends "<index> <worker> <unix time>" to
    probe-<run>.log on the worker host. One line per COMPLETED execution, so a task that ran to
    the end twice shows twice, and one that never ran does not show."""
    time.sleep(float(seconds))
    _log_completion(run, index, self.request.hostname)
    return {"index": int(index), **_where(self.request)}


@app.task(bind=True)
def cpu_probe(self, run, index, seconds):
    """The load suite's CPU-bound task: computes for ``seconds`` of this thread's CPU time (so
    its cost is known: the pool's bound is concurrency / seconds while it has the cores), then
    logs its completion like crawl_probe."""
    end = time.thread_time() + float(seconds)
    while time.thread_time() < end:
        pass
    _log_completion(run, index, self.request.hostname)
    return {"index": int(index), **_where(self.request)}


@app.task(bind=True)
def hold_gil(self, until):
    """The health test's blocked worker (molecule/cluster/tests/test_health.py): until the unix
    time `until`, a C call that keeps Python's GIL (libc's sleep() through ctypes.PyDLL, as a C
    extension that never releases it would), so nothing else in the process runs, its event
    loop included. In a prefork child only that child stops; a threads worker stops whole."""
    import ctypes
    import ctypes.util

    seconds = int(float(until) - time.time())
    if seconds > 0:
        ctypes.PyDLL(ctypes.util.find_library("c")).sleep(seconds)
    return {"held": max(seconds, 0), **_where(self.request)}


@app.task(bind=True)
def cpu_poison(self, run, kills=None):
    """A poison task: appends "<worker> <pid> <unix time>" to poison-<run>.log on the worker host
    (one line per attempt), then kills its own process with SIGKILL, as an OOM kill would: the
    prefork pool loses a child (WorkerLostError). With ``kills``, only the first ``kills``
    attempts die and the next one returns (a replayed message that now succeeds).

    Routed with cpu_* to the cpu queue. Prefork only: a threads pool runs the task in the
    worker's own process, which SIGKILL would take down whole (the worker, not a child), so
    there the task fails with RuntimeError instead."""
    path = os.path.join(os.environ.get(PROBE_DIR_ENV, DEFAULT_PROBE_DIR), f"poison-{run}.log")
    try:
        with open(path, encoding="utf-8") as log:
            attempts = len(log.readlines())
    except FileNotFoundError:
        attempts = 0
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"{self.request.hostname} {os.getpid()} {time.time():.3f}\n")
    if kills is None or attempts < int(kills):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("cpu_poison kills prefork children only; this is a threads pool")
        os.kill(os.getpid(), signal.SIGKILL)
    return {"attempts": attempts + 1, **_where(self.request)}
