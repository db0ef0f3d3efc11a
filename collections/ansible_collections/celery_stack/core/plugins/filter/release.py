# -*- coding: utf-8 -*-
"""The application's releases: what defines one, where it lives, which ones go.

roles/celery_app builds every release of the application in a fresh directory of its own
(``<base>/releases/<id>/``: ``venv/``, ``src/``, ``dist/``, ``digest``) and makes it live by
pointing the symlink ``<base>/current`` at it; the venv path the units run (celery_app_venv)
is a symlink to ``current/venv``. Nothing here touches a host: the host-side half (build,
digest, state) is roles/celery_app/files/opt/celery-stack/bin/celery-stack-release.

- ``release_spec``: the inputs that define a release, as one JSON-able dict (no secret:
  pip's extra arguments count by their digest only);
- ``release_id``: the release's name, a digest of its spec: the same inputs give the same
  release on every host and every run, any change of them a new one;
- ``release_layout``: the paths of a release and of the live links;
- ``releases_to_prune``: the releases a host no longer keeps.
"""

import hashlib
import json
import posixpath

# Bumped when the way a release is built changes: every host then builds its release again.
LAYOUT_VERSION = 1


def _sha1(text):
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def release_spec(app_kind, source, source_digest="", celery_version="", celery_extras=(), pip_packages=(),
                 pip_extra_args="", python="python3", python_version="", import_path=""):
    """Everything a release is built from. For a file or directory source: its base name and the
    digest of its content (tree_digest), not the controller's path (a moved checkout is the same
    release); for a pip requirement: the requirement itself. python_version: the host's
    interpreter (a Debian upgrade of python3 builds the release again)."""
    extras = sorted(set(celery_extras or ()))
    celery = "celery" + (f"[{','.join(extras)}]" if extras else "") + f"=={celery_version}"
    if app_kind in ("file", "directory"):
        app = {"kind": app_kind, "name": posixpath.basename(str(source).rstrip("/")), "digest": source_digest}
    elif app_kind == "requirement":
        app = {"kind": app_kind, "requirement": str(source)}
    else:
        raise ValueError(f"unknown application kind {app_kind!r}")
    return {
        "layout": LAYOUT_VERSION,
        "celery": celery,
        "pip_packages": list(pip_packages or ()),
        "app": app,
        # pip's arguments may carry an index URL with credentials: only their digest is kept.
        "pip_extra_args": _sha1(pip_extra_args) if pip_extra_args else "",
        "python": python,
        "python_version": str(python_version).strip(),
        "import_path": import_path,
    }


def release_id(spec):
    """The release's name: the first 16 hex digits of the sha1 of its canonical JSON."""
    return _sha1(json.dumps(spec, sort_keys=True, separators=(",", ":")))[:16]


def release_layout(base_dir, release):
    """The paths of release `release` under `base_dir`, and the live link."""
    base_dir = str(base_dir).rstrip("/")
    root = f"{base_dir}/releases/{release}"
    return {
        "releases": f"{base_dir}/releases",
        "current": f"{base_dir}/current",
        "root": root,
        "venv": f"{root}/venv",
        "src": f"{root}/src",
        "dist": f"{root}/dist",
        "digest": f"{root}/digest",
    }


def releases_to_prune(releases, live, wanted, kept=2):
    """The releases to delete after the switch: all but the wanted one (live from now on) and
    `kept` older ones for rollback. The release live before this run is always among those kept
    (the workers run it until the handlers restart them at the end of the play); the rest of the
    `kept` are the most recently built complete others. Incomplete ones (no digest: a build that
    failed) go. releases: the `releases` list of `celery-stack-release status` ({id, built, ...})."""
    kept = max(int(kept), 1)
    keep = {wanted}
    if live and live != wanted:
        keep.add(live)
        kept -= 1
    others = sorted((r for r in releases if r["id"] not in keep and r.get("built") is not None),
                    key=lambda r: (r["built"], r["id"]), reverse=True)
    keep.update(r["id"] for r in others[:kept])
    return sorted(r["id"] for r in releases if r["id"] not in keep)


class FilterModule:
    def filters(self):
        return {f.__name__: f for f in (release_spec, release_id, release_layout, releases_to_prune)}
