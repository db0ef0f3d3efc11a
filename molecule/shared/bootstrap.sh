#!/usr/bin/env bash
# Everything the README's commands need, made idempotent and fast when warm:
#   1. a controller venv from requirements.txt (+ collections from requirements.yml, offline);
#   2. a Docker engine that answers (on Debian: install docker.io and start dockerd);
#   3. local systemd base images for Debian 12 and 13, rebuilt only when their recipe changed.
# Source it (it exports PATH and DOCKERD_STARTED_PID) or run it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache="$root/.cache"
mkdir -p "$cache"
say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[bootstrap] %s\033[0m\n' "$*" >&2; exit 1; }
is_debian() { [ -r /etc/debian_version ] && command -v apt-get >/dev/null; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- 1. controller venv --------------------------------------------------------------------
venv="$root/.venv"
want=$(cat "$root/requirements.txt" "$root/requirements.yml" | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.celery-stack-stamp" 2>/dev/null)" != "$want" ]; then
  command -v python3 >/dev/null || die "python3 is missing: install Python 3.11 or newer."
  say "creating the controller venv from requirements.txt"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -qq --disable-pip-version-check -r "$root/requirements.txt"
  # The collections come bundled with the `ansible` package: this answers "Nothing to do"
  # without Galaxy, and fails if requirements.yml asks for a range the bundle does not meet.
  "$venv/bin/ansible-galaxy" collection install -r "$root/requirements.yml" >/dev/null
  echo "$want" >"$venv/.celery-stack-stamp"
fi
export PATH="$venv/bin:$PATH"

# --- 2. a Docker engine ----------------------------------------------------------------------
export DOCKERD_STARTED_PID=${DOCKERD_STARTED_PID:-}
if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    is_debian || die "No Docker engine answers. Install Docker Engine and debootstrap, start the engine, and run this again."
    say "installing docker.io and debootstrap from Debian"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
  fi
  if ! docker info >/dev/null 2>&1; then
    # Pid files left by an engine that was killed without its shutdown (a machine snapshot, a
    # SIGKILL) name pids that may belong to other processes by now: dockerd then waits for a
    # containerd that is not there (76 s measured) or refuses to start. With no engine running,
    # they are stale by definition.
    if ! pgrep -x dockerd >/dev/null && ! pgrep -x containerd >/dev/null; then
      as_root rm -f /var/run/docker.pid /var/run/docker/containerd/containerd.pid
    fi
    say "starting dockerd (log: $cache/dockerd.log)"
    as_root dockerd >"$cache/dockerd.log" 2>&1 &
    DOCKERD_STARTED_PID=$!
    echo "$DOCKERD_STARTED_PID" >"$cache/dockerd.pid"
    for _ in $(seq 240); do
      docker info >/dev/null 2>&1 && break
      # (not kill -0: dockerd runs as root through sudo, which an unprivileged user may not signal)
      [ -d "/proc/$DOCKERD_STARTED_PID" ] || break
      sleep 0.5
    done
    if ! docker info >/dev/null 2>&1; then
      tail -n 20 "$cache/dockerd.log" >&2 || true
      die "dockerd did not answer within 120 s (or exited); the end of its log is above, all of it in $cache/dockerd.log"
    fi
  fi
fi
command -v debootstrap >/dev/null || { is_debian && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; } \
  || die "debootstrap is missing: install it to build the base images."
# tcpdump: the cluster scenario records its docker network (molecule/shared/capture.py) to prove
# that no secret and no task crosses it in clear. Debian has it in /usr/bin, older releases in
# /usr/sbin (not on an ordinary user's PATH).
if ! command -v tcpdump >/dev/null && [ ! -x /usr/sbin/tcpdump ]; then
  is_debian || die "tcpdump is missing: install it (the cluster scenario captures its docker network with it)."
  say "installing tcpdump from Debian"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tcpdump >/dev/null
fi
# promtool: the unit tests run the alert rules against their promtool tests
# (roles/celery_monitoring/tests). Debian's prometheus package has it; only the binary is
# unpacked into .cache (installing the package would start a Prometheus on this machine).
if ! command -v promtool >/dev/null && [ ! -x "$cache/promtool/usr/bin/promtool" ]; then
  is_debian || die "promtool is missing: install Prometheus's promtool (the unit tests run the alert rules' tests with it)."
  say "unpacking promtool from Debian's prometheus package into $cache/promtool"
  as_root apt-get update -qq
  (cd "$cache" && rm -f prometheus_*.deb && apt-get download -qq prometheus \
    && dpkg-deb -x prometheus_*.deb "$cache/promtool.tmp" && rm -f prometheus_*.deb)
  mkdir -p "$cache/promtool/usr/bin"
  mv "$cache/promtool.tmp/usr/bin/promtool" "$cache/promtool/usr/bin/promtool" && rm -rf "$cache/promtool.tmp"
fi

# --- 3. base images ----------------------------------------------------------------------------
recipe="$root/molecule/shared/images/recipe.sh"
rev=$(sha256sum "$recipe" | cut -c1-12)
for pair in 12:bookworm 13:trixie; do
  version=${pair%%:*} codename=${pair#*:}
  image="celery-stack-debian:$version"
  if ! docker image inspect "$image-$rev" >/dev/null 2>&1; then
    say "building $image from Debian $codename (debootstrap, about a minute)"
    as_root "$recipe" "$codename" "$image-$rev"
  fi
  # The stable tag the scenarios and the local stack use follows the current recipe.
  docker tag "$image-$rev" "$image"
done
