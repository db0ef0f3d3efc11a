# -*- coding: utf-8 -*-
"""celery_stack.core.files: a role's directories and files, declared once, written where they differ.

    - name: Write the role's directories and files
      celery_stack.core.files:
        dirs:  [{path, owner, group, mode}, ...]               # owner/group: default root, null unmanaged
        files: [{dest, content, owner, group, mode, restarts, secret}, ...]
      register: role__files
      notify: ...

One remote call (ansible.builtin.find with checksums) reads the state of every path; the
comparison (module_utils/managed_files.py, unit-tested) picks the ones whose type, content,
owner, group or mode differ, and only those are written: a directory with ansible.builtin.file,
a file through the copy action (atomic, --check and --diff as the copy module does them). A file
marked `secret: true` never shows its content in a diff.

Returns `changed`, `changed_paths` (every path written, in declaration order, with `reasons`) and
`restarts`: the `restarts` targets of the files that changed, each once. A role's handlers
read that one list to decide what to restart.
"""

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible_collections.celery_stack.core.plugins.module_utils.managed_files import DEFAULT_OWNER, find_args, plan, restarts


class ActionModule(ActionBase):
    TRANSFERS_FILES = True
    _VALID_ARGS = frozenset(("dirs", "files"))

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        dirs = list(self._task.args.get("dirs") or [])
        files = list(self._task.args.get("files") or [])
        for entry in dirs:
            if not isinstance(entry, dict) or not entry.get("path"):
                raise AnsibleActionFail(f"celery_stack.core.files: every entry of dirs needs a path, got {entry!r}")
        for entry in files:
            if not isinstance(entry, dict) or not entry.get("dest") or not isinstance(entry.get("content"), str):
                raise AnsibleActionFail("celery_stack.core.files: every entry of files needs dest and content (a string)")
        try:
            found = self._execute_module(
                module_name="ansible.builtin.find", task_vars=task_vars,
                module_args=dict(find_args([d["path"] for d in dirs] + [f["dest"] for f in files]),
                                 file_type="any", hidden=True, get_checksum=True))
            if found.get("failed"):
                raise AnsibleActionFail(f"celery_stack.core.files: reading the paths failed: {found.get('msg')}")
            todo = plan(dirs, files, found.get("files"))
            changed_paths, diffs, changed_files = [], [], []
            for entry, reasons in todo["dirs"]:
                done = self._execute_module(
                    module_name="ansible.builtin.file", task_vars=task_vars,
                    module_args={"path": entry["path"], "state": "directory", "mode": entry.get("mode"),
                                 "owner": entry.get("owner", DEFAULT_OWNER), "group": entry.get("group", DEFAULT_OWNER)})
                self._check(done, entry["path"])
                if done.get("changed"):
                    changed_paths.append({"path": entry["path"], "reasons": reasons})
                    if done.get("diff"):
                        diffs.append(done["diff"])
            for entry, reasons in todo["files"]:
                done = self._copy(entry, task_vars)
                self._check(done, entry["dest"])
                if done.get("changed"):
                    changed_paths.append({"path": entry["dest"], "reasons": reasons})
                    changed_files.append(entry)
                    if done.get("diff") and not entry.get("secret"):
                        diffs.extend(done["diff"] if isinstance(done["diff"], list) else [done["diff"]])
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        result.update(changed=bool(changed_paths), changed_paths=changed_paths, restarts=restarts(changed_files))
        if diffs:
            result["diff"] = diffs
        return result

    def _copy(self, entry, task_vars):
        """One file through the copy action (atomic write, check mode, diff), as template does."""
        task = self._task.copy()
        task.args = {"content": entry["content"], "dest": entry["dest"], "mode": entry.get("mode"),
                     "owner": entry.get("owner", DEFAULT_OWNER), "group": entry.get("group", DEFAULT_OWNER)}
        if entry.get("secret"):
            task.diff = False
        copy = self._shared_loader_obj.action_loader.get(
            "ansible.legacy.copy", task=task, connection=self._connection, play_context=self._play_context,
            loader=self._loader, templar=self._templar, shared_loader_obj=self._shared_loader_obj)
        return copy.run(task_vars=task_vars)

    @staticmethod
    def _check(done, path):
        if done.get("failed"):
            raise AnsibleActionFail(f"celery_stack.core.files: writing {path} failed: {done.get('msg')}")
