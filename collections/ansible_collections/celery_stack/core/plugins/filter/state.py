# -*- coding: utf-8 -*-
"""What a host already has, read once, so a run that changes nothing costs few remote calls.

Writing files is the action celery_stack.core.files' business (plugins/action/files.py); these
filters answer the other questions a role asks before it acts:

- ``find_args`` (the action's own) and ``path_states``: which of a set of paths exist, from one
  ansible.builtin.find (a dry run must not start a unit that is not written yet);
- ``tree_digest``: one checksum for a directory tree on the controller (the application source);
- ``unit_states``: ``systemctl show`` output as {unit: {ActiveState, UnitFileState, ...}};
- ``packages_to_install``: the packages that dpkg does not show installed at the wanted version.
"""

import fnmatch
import hashlib
import os

from ansible_collections.celery_stack.core.plugins.module_utils.managed_files import find_args


def path_states(files):
    return {f["path"]: f for f in files}


def tree_digest(root):
    """sha1 over the relative paths, modes and contents of every file below `root` (sorted), so
    a copy of the tree is needed exactly when this changes. Build artefacts are ignored. For a
    file, the sha1 of its content."""
    digest = hashlib.sha1()
    if os.path.isfile(root):
        with open(root, "rb") as handle:
            digest.update(handle.read())
        return digest.hexdigest()
    skip = {"__pycache__", ".git", ".tox", ".venv", "build", "dist"}
    for directory, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.endswith(".egg-info"))
        for name in sorted(names):
            full = os.path.join(directory, name)
            if name.endswith(".pyc") or not os.path.isfile(full):
                continue
            digest.update(os.path.relpath(full, root).encode() + b"\0")
            digest.update(oct(os.stat(full).st_mode & 0o777).encode() + b"\0")
            with open(full, "rb") as handle:
                digest.update(hashlib.sha1(handle.read()).digest())
    return digest.hexdigest()


def unit_states(show_output):
    """`systemctl show -p Id,ActiveState,UnitFileState UNIT...` -> {Id: {property: value}}."""
    units = {}
    for block in show_output.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if "Id" in props:
            units[props["Id"]] = props
    return units


def packages_to_install(dpkg_output, wanted):
    """`dpkg-query -W -f '${Package} ${db:Status-Abbrev} ${Version}\\n' PKG...` against {package: apt
    version pattern or ""}: the packages that are missing or at a version the pattern (a glob,
    as apt pins use them) does not match. Empty: the apt task has nothing to do."""
    installed = {}
    for line in dpkg_output.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[1] == "ii":
            installed[fields[0]] = fields[2]
    return [name for name, pattern in wanted.items()
            if name not in installed or (pattern and not fnmatch.fnmatchcase(installed[name], pattern))]


class FilterModule:
    def filters(self):
        return {f.__name__: f for f in (path_states, find_args, tree_digest, unit_states, packages_to_install)}
