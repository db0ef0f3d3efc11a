#!/usr/bin/env bash
# Recipe for the local systemd base images (no registry needed): debootstrap a minimal Debian
# with systemd as PID 1 and what Ansible needs, then `docker import` it.
# Changing this file changes its hash, which is part of the image tag, so images rebuild.
# Usage: recipe.sh CODENAME IMAGE:TAG
set -euo pipefail
codename=$1 image=$2
rootfs=$(mktemp -d /var/tmp/celery-stack-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,dbus,python3,python3-apt,sudo,gnupg,ca-certificates,iproute2,procps \
  "$codename" "$rootfs" http://deb.debian.org/debian >/dev/null
# debootstrap writes only the main suite; add updates and security like a real host has.
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb http://deb.debian.org/debian $codename main
deb http://deb.debian.org/debian $codename-updates main
deb http://deb.debian.org/debian-security $codename-security main
SOURCES
# A container has no console to log in on and no kernel to tune.
for unit in getty.target console-getty.service systemd-sysctl.service \
            systemd-modules-load.service sys-kernel-config.mount; do
  ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done
echo "$codename" >"$rootfs/etc/hostname"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import \
  -c 'CMD ["/lib/systemd/systemd"]' -c 'ENV container=docker' \
  - "$image" >/dev/null
