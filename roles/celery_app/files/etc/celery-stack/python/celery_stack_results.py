# Managed by Ansible (role celery_app of celery-stack): local changes are overwritten.
"""The deployment's Redis result backend: Celery's own, with a result's notification that cannot
be lost. celery_stack_config.apply(app) makes every redis:// and rediss:// result backend of the
app this one (the loader's backend aliases; the result_backend setting itself stays as it is).

Celery's Redis result consumer learns that a task's result is stored from a notification on the
task's channel (pub/sub). get() subscribes to the channel on the pub/sub connection and then reads
the task's state on another connection, without waiting for the subscription to take effect. When
Redis runs the read first and a worker stores and publishes the result in between, the
notification goes to nobody and get() waits until its timeout (without one: forever) for a result
that is stored. Seen in the cluster scenario's fault suite with TLS (which makes Redis serve its
connections in a less predictable order): one get() in about two broker restarts waited until the
client's deadline, 112 to 119 s, for a SUCCESS stored long before, its channel subscribed
(py-spy: the client polling the pub/sub socket; Redis: PUBSUB CHANNELS, GET).

Here a client that waits reads the states of the results it waits for again, once per
RECHECK_SECONDS while it waits (one MGET, as Celery itself does after a reconnect): a lost
notification costs at most that long. Clients that get their notifications never see a
difference.
"""

import time

from celery.backends import redis

RECHECK_SECONDS = 1.0


class ResultConsumer(redis.ResultConsumer):
    _rechecked_at = 0.0

    def drain_events(self, timeout=None):
        super().drain_events(timeout)
        now = time.monotonic()
        if now - self._rechecked_at >= RECHECK_SECONDS:
            self._rechecked_at = now
            self.recheck()

    def recheck(self):
        """Deliver every result waited for that is stored and ready, as its notification would."""
        with self._locked():
            keys = sorted(self.subscribed_to)
        if not keys:
            return
        metas = []
        # Redis away: Celery's own reconnect, which reads the same states once it is back.
        with self.reconnect_on_error():
            metas = self.backend.client.mget(keys)
        for meta in metas:
            if meta:
                meta = self._decode_result(meta)
                if meta["status"] in redis.states.READY_STATES:
                    self.on_state_change(meta, None)


class RedisBackend(redis.RedisBackend):
    ResultConsumer = ResultConsumer
