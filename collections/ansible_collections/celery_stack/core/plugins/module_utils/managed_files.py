# -*- coding: utf-8 -*-
"""What the action celery_stack.core.files decides, as plain functions (unit-tested without a host).

A role declares its directories and files once, each with its owner, group and mode (and, for a
file, its content and what a change to it restarts). Owner and group default to root; None
leaves them to whoever else manages them (a package that chowns its configuration directory). The action reads the state of all of them
with ONE remote call (ansible.builtin.find with checksums), and ``plan`` says which paths differ
and why; only those are written.
"""

import hashlib
import posixpath

DEFAULT_OWNER = "root"


def find_args(paths):
    """{paths, patterns} for ansible.builtin.find: every parent directory and every base name.
    (find may then report a few more paths than asked for; they are never looked up.)"""
    paths = [p.rstrip("/") for p in paths]
    return {"paths": sorted({posixpath.dirname(p) or "/" for p in paths}),
            "patterns": sorted({posixpath.basename(p) for p in paths})}


def checksum(content):
    """sha1 of a file's content as ansible.builtin.find reports it (get_checksum)."""
    return hashlib.sha1(str(content).encode("utf-8")).hexdigest()


def _mode(mode):
    return str(mode).lstrip("0") or "0"


def differences(entry, state, content=None):
    """Why `entry` ({path or dest, owner, group, mode}) must be written, given what find
    reported for its path (None: missing): a list of reasons, empty when it is as declared.
    content None: a directory."""
    if state is None:
        return ["missing"]
    reasons = []
    if content is None:
        if not state.get("isdir"):
            reasons.append("not a directory")
    elif state.get("isdir") or state.get("islnk") or state.get("checksum") != checksum(content):
        reasons.append("content")
    for key, found in (("owner", "pw_name"), ("group", "gr_name")):
        wanted = entry.get(key, DEFAULT_OWNER)
        if wanted is not None and state.get(found) != wanted:
            reasons.append(key)
    if "mode" in entry and _mode(state.get("mode", "")) != _mode(entry["mode"]):
        reasons.append("mode")
    return reasons


def plan(dirs, files, found):
    """The directories and files to write, in declaration order: [(entry, reasons)] each.
    found: the `files` list of ansible.builtin.find's result."""
    states = {f["path"]: f for f in found or []}
    return {
        "dirs": [(d, r) for d in dirs or [] for r in [differences(d, states.get(d["path"].rstrip("/")))] if r],
        "files": [(f, r) for f in files or [] for r in [differences(f, states.get(f["dest"]), f["content"])] if r],
    }


def restarts(changed_files):
    """The restart targets of the files that changed, each once, in declaration order ("none" and
    empty targets left out)."""
    targets = []
    for entry in changed_files:
        target = entry.get("restarts") or "none"
        if target != "none" and target not in targets:
            targets.append(target)
    return targets
