# -*- coding: utf-8 -*-
"""One pass over a host's state: read it once, change only what differs.

A template or file task costs a module run on the host even when nothing changes (it has to
stat the destination). A role reads the state of all its paths with ONE ansible.builtin.find
(get_checksum) instead, and guards each write with ``stale``: a path is written when it is
missing or its content (sha1 of what the template renders on the controller), owner, group or
mode differ. A guard that cannot tell (a path the find did not report) lets the real task run,
which then decides as usual: the guard can only save work, never skip a needed change.

- ``path_states``: the find result as {path: state};
- ``stale``: whether one path needs its task;
- ``find_args``: the directories and name patterns that make find report a set of paths;
- ``tree_digest``: one checksum for a directory tree on the controller (the application source);
- ``unit_states``: ``systemctl show`` output as {unit: {ActiveState, UnitFileState, ...}};
- ``packages_to_install``: the packages that dpkg does not show installed at the wanted version.
"""

import fnmatch
import hashlib
import os
import posixpath


def path_states(files):
    return {f["path"]: f for f in files}


def stale(path, states, content=None, owner=None, group=None, mode=None):
    """True when `path` must be (re)written: missing, another type, or content, owner, group or
    mode differ (content None: a directory; owner, group, mode None: not managed)."""
    state = states.get(path)
    if state is None:
        return True
    if content is None:
        if not state.get("isdir"):
            return True
    elif state.get("isdir") or state.get("checksum") != hashlib.sha1(str(content).encode("utf-8")).hexdigest():
        return True
    if (owner is not None and state.get("pw_name") != owner) or (group is not None and state.get("gr_name") != group):
        return True
    return mode is not None and state.get("mode", "").lstrip("0") != str(mode).lstrip("0")


def find_args(paths):
    """{paths, patterns} for ansible.builtin.find: every parent directory and every base name.
    (find may then report a few more paths than asked for; they are never looked up.)"""
    paths = [p.rstrip("/") for p in paths]
    return {"paths": sorted({posixpath.dirname(p) for p in paths}),
            "patterns": sorted({posixpath.basename(p) for p in paths})}


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
        return {f.__name__: f for f in (path_states, stale, find_args, tree_digest, unit_states, packages_to_install)}
