# Managed by Ansible (role celery_app of celery-stack): local changes are overwritten.
"""What the deployment adds to a Celery worker (a unit runs with CELERY_POOL set, and
celery_stack_config.POOL_SETTINGS names this module's Consumer as ``worker_consumer``): five
things, each with its reason.

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

4. Poison tasks (``Request``, ``DeadLetters``: the section "Poison tasks"): a message whose task
   has killed its worker process N times goes to a dead-letter queue, its result records FAILURE.

5. Revoke from producer hosts (``ProducerControl``: the last section): a web app's "cancel"
   (``AsyncResult.revoke()``) reaches the workers through a mailbox of its own that understands
   ``revoke`` and nothing else, so the producers' broker user can cancel tasks but cannot shut
   workers down or change their pools through Celery's full remote control.
"""

import json
import os
import socket
import threading
import time

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery import bootsteps, signals
from celery.utils.log import get_logger
from celery.worker import consumer, control, pidbox, state
from celery.worker import request as celery_request
from kombu import Exchange, Queue
from kombu.utils.encoding import safe_repr, safe_str

# The events connection (see 1. above): every other transport option of the stack stays.
EVENTS_TRANSPORT_OPTIONS = {"confirm_publish": False}


class Consumer(consumer.Consumer):
    """Celery's consumer with the deployment's steps; only the connection of its event
    dispatcher differs."""

    class Blueprint(consumer.Consumer.Blueprint):
        default_steps = (*consumer.Consumer.Blueprint.default_steps, "celery_stack_worker:Watchdog",
                         "celery_stack_worker:DeadLetters", "celery_stack_worker:ProducerControl")

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


# =============================================================================================
# Poison tasks: a message that kills its worker process N times is dead-lettered.
# =============================================================================================
# With task_acks_late + task_reject_on_worker_lost, Celery requeues a task whose prefork child
# died (SIGKILL, an OOM kill, a segfault): a task that kills its child every time is requeued for
# ever on a classic queue (measured: 33 attempts in 2 minutes), and on a quorum queue RabbitMQ
# drops it after its delivery limit. The deployment's Request counts the deaths of a message in
# a header of its own, the same way on both queue types (x-delivery-count exists on quorum
# queues only, and also counts returns that are no death: a worker restart, a lost connection):
#
# - below the limit (celery_stack_task_worker_lost_limit, N): the message is published again,
#   the same body, properties and headers with the count + 1, with publisher confirms (the
#   app's broker_transport_options), then the delivered one is acknowledged: the copy is the
#   redelivery. Should the publish fail, Celery's own requeue happens (nothing is lost);
# - at N: the task is recorded FAILURE in the result backend (WorkerLostError, with the
#   dead-letter queue named), and the message is rejected without requeue: RabbitMQ sends it
#   to the queue's dead-letter exchange (the broker's policy, roles/rabbitmq), into
#   <queue>.dead-letter, which the workers declare at start (DeadLetters below). Replay:
#   celery_stack_dead_letters.py.
#
# N = 0: Celery's own behaviour. The threads pool runs tasks in the worker's own process: there
# is no child to lose, and a task that kills the process kills the worker, whose unacknowledged
# messages the broker requeues; the Request cannot count those (quorum queues' delivery-limit
# is the safety net). Tasks with retry_on_worker_lost keep Celery's handling.


logger = get_logger(__name__)

LIMIT_SETTING = "celery_stack_task_worker_lost_limit"
DEATHS_HEADER = "x-celery-stack-deaths"
DEAD_LETTER_EXCHANGE = "celery-stack.dead-letter"
DEAD_LETTER_SUFFIX = ".dead-letter"
REQUEST = "celery_stack_worker:Request"
CELERY_REQUEST = "celery.worker.request:Request"
# Headers RabbitMQ sets itself on delivery: a copy must not carry them.
BROKER_HEADERS = ("x-delivery-count", "x-acquired-count")
# AMQP properties a copy keeps (user_id is checked against the publishing user: not kept).
COPIED_PROPERTIES = ("correlation_id", "reply_to", "priority", "delivery_mode", "expiration",
                     "message_id", "timestamp", "type", "app_id")
# Celery's native delayed delivery (quorum queues): 28 bits of remaining delay in front of the
# routing key, published to the celery_delayed_<level> exchanges.
DELAY_BITS = 28


def dead_letter_queue(queue):
    return queue + DEAD_LETTER_SUFFIX


def deaths(headers):
    """How many times this message has killed a worker process (its header; 0 when absent)."""
    try:
        return max(0, int((headers or {}).get(DEATHS_HEADER) or 0))
    except (TypeError, ValueError):
        return 0


def verdict(died, limit):
    """What to do with a message whose task killed its process, now the died-th time:
    "celery" (limit 0: Celery requeues), "redeliver" (below the limit) or "dead-letter"."""
    if limit <= 0:
        return "celery"
    return "redeliver" if died < limit else "dead-letter"


def queue_of(delivery_info):
    """The routed queue a message was delivered for: its routing key (the deployment routes
    every queue by its own name), without the delay bits of Celery's delayed delivery."""
    key = (delivery_info or {}).get("routing_key") or ""
    parts = key.split(".")
    if len(parts) > DELAY_BITS and all(bit in ("0", "1") for bit in parts[:DELAY_BITS]):
        return ".".join(parts[DELAY_BITS:])
    return key


def redelivery(message, died):
    """The publish() arguments of the copy of ``message`` that counts ``died`` deaths: same body,
    content type and encoding, properties and headers, to the same exchange and routing key. A
    message that came through delayed delivery goes straight to its queue (default exchange)
    instead of waiting out its delay again."""
    info = message.delivery_info or {}
    exchange, routing_key = info.get("exchange") or "", info.get("routing_key") or ""
    if exchange.startswith("celery_delayed_") or queue_of(info) != routing_key:
        exchange, routing_key = "", queue_of(info)
    headers = {name: value for name, value in (message.headers or {}).items() if name not in BROKER_HEADERS}
    headers[DEATHS_HEADER] = int(died)
    properties = {name: message.properties[name] for name in COPIED_PROPERTIES
                  if message.properties.get(name) is not None}
    return {"body": message.body, "exchange": exchange, "routing_key": routing_key, "headers": headers,
            "content_type": message.content_type, "content_encoding": message.content_encoding,
            **properties}


def dead_letter_reason(died, queue, lost):
    return (f"the task killed its worker process {died} times (last: {lost}); its message is in the "
            f"dead-letter queue {dead_letter_queue(queue)}")


def _is_worker_lost(req, exc):
    # As Celery's on_failure: billiard >= 4.3 reports a lost child as SystemExit, unless the
    # worker itself stopped it (a revoke, a cancel on connection loss).
    if isinstance(exc, WorkerLostError):
        return True
    return (isinstance(exc, (SystemExit, KeyboardInterrupt))
            and not (req._already_cancelled or req._already_revoked))


class Request(celery_request.Request):
    """Celery's Request; only a lost worker process of a late-acknowledged task differs."""

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        limit = int(self.app.conf.get(LIMIT_SETTING) or 0)
        task = self.task
        if (not _is_worker_lost(self, exc) or limit <= 0 or not task.acks_late
                or not task.reject_on_worker_lost or task.retry_on_worker_lost
                or state.should_terminate or state.should_stop or self._success_was_stored()):
            # Not a death this deployment counts (a cold shutdown kills children too).
            return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        died = deaths(self._message.headers) + 1
        if verdict(died, limit) == "redeliver":
            try:
                with self.app.producer_or_acquire() as producer:
                    producer.publish(retry=True, retry_policy={"max_retries": 3}, **redelivery(self._message, died))
            except Exception as error:  # noqa: BLE001 - Celery's requeue: nothing is lost
                logger.error("Task %s[%s] killed its worker process; publishing its redelivery failed "
                             "(%r): requeued by Celery instead", self.task_name, self.id, error)
                return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
            state.task_ready(self)
            self.acknowledge()
            self.send_event("task-rejected", requeue=True)
            logger.warning("Task %s[%s] killed its worker process (%s), %d of %d times: delivered again",
                           self.task_name, self.id, exc, died, limit)
            return None
        return self._dead_letter(exc, died, send_failed_event)

    def _dead_letter(self, lost, died, send_failed_event):
        state.task_ready(self)
        queue = queue_of(self._message.delivery_info)
        exc = WorkerLostError(dead_letter_reason(died, queue, lost))
        try:
            raise exc
        except WorkerLostError:
            einfo = ExceptionInfo(internal=True)
        self.task.backend.mark_as_failure(self.id, exc, request=self._context, store_result=self.store_errors)
        self.task.request_stack.push(self._context)
        try:
            signals.task_failure.send(sender=self.task, task_id=self.id, exception=exc, args=self.args,
                                      kwargs=self.kwargs, traceback=einfo.traceback, einfo=einfo)
        finally:
            self.task.request_stack.pop()
        # Rejected without requeue: RabbitMQ dead-letters it (the queue's policy).
        self.reject(requeue=False)
        if send_failed_event:
            self.send_event("task-failed", exception=safe_repr(exc), traceback=einfo.traceback)
        logger.error("Task %s[%s] %s", self.task_name, self.id, exc)


def install_request(app):
    """Every task whose Request is Celery's default gets the deployment's; a task with a Request
    of its own keeps it. Returns the names of the tasks changed."""
    changed = []
    for name, task in app.tasks.items():
        current = task.Request
        if current in (CELERY_REQUEST, celery_request.Request):
            task.Request = REQUEST
            changed.append(name)
    return changed


# A quorum dead-letter queue's delivery limit: a listing of celery_stack_dead_letters puts every
# message back, which counts as a delivery, and RabbitMQ 4 drops a message after 20 by default.
DEAD_LETTER_DELIVERY_LIMIT = 1_000_000


def dead_letter_entities(queue_types):
    """The dead-letter exchange (direct) and, per routed queue ({name: queue type}),
    <queue>.dead-letter: durable, bound with the queue's name (the broker's policy sets that
    dead-letter routing key), of the routed queue's type: in a cluster a quorum queue, replicated
    like the queue it serves (a classic one lives on one node, and while that node is down it can
    neither take dead letters nor be declared), whose delivery limit no listing reaches."""
    exchange = Exchange(DEAD_LETTER_EXCHANGE, type="direct", durable=True)
    return exchange, [Queue(dead_letter_queue(name), exchange, routing_key=name, durable=True,
                            queue_arguments={"x-queue-type": "quorum", "x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT}
                            if queue_type == "quorum" else {"x-queue-type": "classic"})
                      for name, queue_type in queue_types.items()]


class DeadLetters(bootsteps.StartStopStep):
    """A consumer step: installs the Request (at the consumer's construction, so before the
    Tasks step builds the task strategies from task.Request) and declares the dead-letter
    exchange and queues on every (re)connection (RabbitMQ only), with the workers' own user,
    which declares their queues too."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        self.limit = int(c.app.conf.get(LIMIT_SETTING) or 0)
        if self.limit > 0:
            install_request(c.app)

    def start(self, c):
        if self.limit <= 0 or c.connection is None or c.connection.transport.driver_type != "amqp":
            return
        queues = c.app.amqp.queues
        exchange, dead = dead_letter_entities({
            name: (queues[name].queue_arguments or {}).get("x-queue-type")
            for name in sorted(queues.consume_from or queues)})
        # Never fatal: a worker that cannot declare them (a node down, a queue declared earlier
        # with another type) still consumes; the next connection tries again.
        try:
            with c.connection.channel() as channel:
                exchange.bind(channel).declare()
                for queue in dead:
                    queue.bind(channel).declare()
        except c.connection_errors + c.channel_errors as error:
            logger.warning("Could not declare the dead-letter queues %s: %r", [q.name for q in dead], error)


# ---------------------------------------------------------------------------------------------
# Revoke from producer hosts
# ---------------------------------------------------------------------------------------------
# Celery's remote control is one mailbox (the fanout exchange celery.pidbox) for every command:
# revoke, but also shutdown, pool_restart, rate_limit, add_consumer, ... RabbitMQ permissions
# name exchanges, not commands, so write access to celery.pidbox would let a web host stop every
# worker. The producers' settings send their control commands to another mailbox
# (control_exchange = the setting below, so the exchange <name>.pidbox), on which their broker
# user may declare and publish only; each worker listens there too, with this one command.

# Where the settings module names the producers' mailbox (RabbitMQ brokers only).
PRODUCER_CONTROL_SETTING = "celery_stack_producer_control_exchange"
# The signals a producer's revoke(terminate=True) may send: ending the task, not pausing it.
PRODUCER_SIGNALS = ("TERM", "KILL")


def producer_revoke(state, task_id, terminate=False, signal=None, **kwargs):
    """Celery's own revoke (the ids are remembered, a running task is terminated if asked and
    the pool can: prefork only), with a signal that ends the task; other arguments are dropped."""
    if signal is not None and str(signal).upper().removeprefix("SIG") not in PRODUCER_SIGNALS:
        signal = None
    return control.Panel.data["revoke"](state, task_id, terminate=bool(terminate), signal=signal)


PRODUCER_COMMANDS = {"revoke": producer_revoke}


class _ProducerBox(pidbox.Pidbox):
    """Celery's worker mailbox (consumption, errors, reconnects), on the producers' exchange and
    with PRODUCER_COMMANDS only."""

    def __init__(self, c, exchange):
        super().__init__(c)
        conf = c.app.conf
        mailbox = c.app.control.Mailbox(
            exchange, type="fanout", accept=conf.accept_content, serializer=conf.task_serializer,
            producer_pool=c.app.amqp.producer_pool, queue_ttl=conf.control_queue_ttl,
            queue_expires=conf.control_queue_expires, queue_exclusive=conf.control_queue_exclusive,
            queue_durable=conf.control_queue_durable)
        self.node = mailbox.Node(safe_str(c.hostname), handlers=PRODUCER_COMMANDS, state=self.node.state)


class ProducerControl(bootsteps.StartStopStep):
    """A consumer step next to Celery's Control: the producers' mailbox."""

    requires = ("celery.worker.consumer.control:Control",)

    def include_if(self, c):
        return bool(c.app.conf.get(PRODUCER_CONTROL_SETTING)) and c.app.conf.worker_enable_remote_control

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        if self.include_if(c):
            self.box = _ProducerBox(c, c.app.conf.get(PRODUCER_CONTROL_SETTING))
            self.start, self.stop, self.shutdown = self.box.start, self.box.stop, self.box.shutdown
