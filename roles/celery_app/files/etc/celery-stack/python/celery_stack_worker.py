# Managed by Ansible (role celery_app of celery-stack): local changes are overwritten.
"""What the deployment adds to a Celery worker (a unit runs with CELERY_POOL set, and
celery_stack_config.POOL_SETTINGS names this module's Consumer as ``worker_consumer``).

1. Task events never wait for a publisher confirm (``Consumer.connection_for_write``).
   The worker sends its events over a connection of their own, which Celery (5.7) registers
   with the worker's event loop so that the broker's heartbeats are read. With the threads
   pool, task events are also published from the pool threads; with publisher confirms on that
   connection (the stack's ``broker_transport_options``), a pool thread waits in
   ``basic_publish_confirm`` for an ack that the event loop reads off the same socket first, so
   it waits for ever, holding the dispatcher's lock, and the event loop then blocks on that lock
   in ``_flush_events``: the whole worker stops (seen: 371 of 2,000 instant tasks, then nothing).
   Confirms make sense where a lost message is a lost task; an event is a monitoring record
   whose queue holds it for 5 s at most, so its connection goes without them.

2. systemd's watchdog (``Watchdog``): the unit has ``Type=notify`` and ``WatchdogSec=``. The
   worker says READY=1 once it consumes, then WATCHDOG=1 every WatchdogSec/4 for as long as its
   event loop turns. A loop that is blocked (a deadlock, a process stopped with SIGSTOP) stops
   the keep-alives and systemd restarts the worker, with no broker round trip and no verdict on
   a worker that is merely busy: a busy loop still turns. While the worker reconnects to the
   broker its loop does not run, but that is the broker's outage, not the worker's fault: the
   keep-alives go on.

3. Progress for the health check (celery-stack-health): with every keep-alive the worker writes
   how many tasks it has completed and how many it runs to $RUNTIME_DIRECTORY/progress.json. A
   worker that misses pings while its count goes up is busy, not dead, and is left alone.
"""

import json
import os
import socket
import threading
import time

from celery import bootsteps
from celery.worker import consumer, state

# The events connection (see 1. above): every other transport option of the stack stays.
EVENTS_TRANSPORT_OPTIONS = {"confirm_publish": False}


class Consumer(consumer.Consumer):
    """Celery's consumer with the deployment's steps; only the connection of its event
    dispatcher differs."""

    class Blueprint(consumer.Consumer.Blueprint):
        default_steps = (*consumer.Consumer.Blueprint.default_steps, "celery_stack_worker:Watchdog")

    def connection_for_write(self, url=None, heartbeat=None):
        # Celery calls this for the event dispatcher's connection only (consumer/events.py).
        return self.ensure_connected(self.app.connection_for_write(
            url=url, heartbeat=heartbeat, transport_options=EVENTS_TRANSPORT_OPTIONS))


def notify(message, address=None):
    """Send one sd_notify datagram to systemd ($NOTIFY_SOCKET); False when there is none."""
    address = address or os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


def watchdog_interval(environ=None):
    """Seconds between keep-alives (a quarter of WatchdogSec), or None when the unit has no
    watchdog for this process (systemd sets WATCHDOG_USEC, and WATCHDOG_PID to the main PID)."""
    environ = os.environ if environ is None else environ
    usec = int(environ.get("WATCHDOG_USEC") or 0)
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and int(pid) != os.getpid()):
        return None
    return usec / 1e6 / 4


class Liveness:
    """When the event loop last turned, and whether the keep-alive is due.

    The loop marks a tick (``tick``) from a timer every ``interval`` seconds; the keep-alive
    thread asks ``alive`` before each WATCHDOG=1. Alive: the loop ticked within ``2 * interval``
    (so at most every other keep-alive is missed before systemd acts), or the consumer is not
    running (connecting again to the broker: its loop is not started, and the broker's outage
    is not the worker's fault)."""

    def __init__(self, interval, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self.last_tick = clock()
        # The longest time between two ticks beyond the interval (how late the loop ran its
        # timer, e.g. under a burst): the margin the watchdog has, written with the progress.
        self.longest_delay = 0.0

    def tick(self):
        now = self.clock()
        self.longest_delay = max(self.longest_delay, now - self.last_tick - self.interval)
        self.last_tick = now

    def alive(self, consuming=True):
        return not consuming or self.clock() - self.last_tick <= 2 * self.interval


class Watchdog(bootsteps.StartStopStep):
    """A consumer step, started after the task consumer (the worker then consumes)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    # Seconds between two progress records when the unit has no watchdog.
    PROGRESS_INTERVAL = 5.0

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        self.watchdog = watchdog_interval()
        self.interval = self.watchdog or self.PROGRESS_INTERVAL
        self.liveness = Liveness(self.interval)
        self.timer_entry = None
        self.thread = None
        self.stopped = threading.Event()
        self.consuming = False

    def start(self, c):
        self.consuming = True
        self.liveness.last_tick = self.liveness.clock()
        if c.hub is not None:
            # Runs on the event loop: a blocked loop stops the ticks.
            self.timer_entry = c.timer.call_repeatedly(self.interval, self.liveness.tick)
        if self.thread is None:
            self.thread = threading.Thread(target=self._keep_alive, args=(c,),
                                           name="celery-stack-watchdog", daemon=True)
            self.thread.start()
        notify("READY=1\nSTATUS=consuming")

    def stop(self, c):
        # The consumer stops (a lost broker connection, or the shutdown): no verdict until it
        # runs again.
        self.consuming = False
        if self.timer_entry is not None:
            c.timer.cancel(self.timer_entry)
            self.timer_entry = None

    def shutdown(self, c):
        self.stop(c)
        notify("STOPPING=1")
        self.stopped.set()

    def _keep_alive(self, c):
        while not self.stopped.wait(self.interval):
            try:
                write_progress(loop_delay=round(self.liveness.longest_delay, 3))
            except OSError:  # no verdict lost: the health check then counts pings only
                pass
            if self.watchdog and (c.hub is None or self.liveness.alive(self.consuming)):
                notify("WATCHDOG=1")


def progress(**extra):
    """Tasks this worker process has completed (Celery's own count) and runs now."""
    return {"completed": state.all_total_count[0], "active": len(state.active_requests),
            "pid": os.getpid(), "time": round(time.time(), 3), **extra}


def write_progress(directory=None, **extra):
    """progress(**extra) to <directory>/progress.json (default: the unit's $RUNTIME_DIRECTORY),
    written whole or not at all (a rename), so the health check never reads half a file."""
    directory = directory or os.environ.get("RUNTIME_DIRECTORY")
    if not directory:
        return None
    path = os.path.join(directory, "progress.json")
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(progress(**extra), handle)
    os.replace(partial, path)
    return path
