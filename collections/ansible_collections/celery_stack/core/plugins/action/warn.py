# -*- coding: utf-8 -*-
"""celery_stack.core.warn: show each message of `msg` (a string or a list) as Ansible's own
[WARNING], on the controller, without touching the host. For what the preflight allows but an
operator should hear about (a warning is seen where a debug line scrolls by)."""

from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        messages = self._task.args.get("msg") or []
        if isinstance(messages, str):
            messages = [messages]
        result.update(changed=False, warnings=[str(m) for m in messages])
        return result
