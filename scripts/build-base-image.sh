#!/usr/bin/env bash
# Build the Debian 12 systemd image that stands in for a VM, without any container registry:
# debootstrap a minimal root and `docker import` it. Does nothing when the image already exists
# (FORCE=1 rebuilds).
set -euo pipefail

image=${BASE_IMAGE:-celery-fleet/debian12-systemd:latest}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image present"
  exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

root=$(mktemp -d /var/tmp/celery-fleet-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT

debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,dbus,python3,python3-apt,sudo,procps,iproute2,ca-certificates \
  bookworm "$root" "$mirror"

# No getty or udev in a container; a fixed machine-id is filled in by systemd at first boot.
rm -f "$root"/etc/machine-id "$root"/var/lib/dbus/machine-id
: >"$root"/etc/machine-id
for unit in getty@tty1.service systemd-udevd.service systemd-udev-trigger.service \
            systemd-firstboot.service console-getty.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
apt_clean='APT::Install-Recommends "false"; APT::Install-Suggests "false";'
echo "$apt_clean" >"$root"/etc/apt/apt.conf.d/90celery-fleet-no-recommends

tar -C "$root" -c . | docker import -c 'CMD ["/lib/systemd/systemd"]' -c 'ENV container=docker' - "$image"
echo "built $image"
