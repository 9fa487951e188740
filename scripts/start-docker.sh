#!/usr/bin/env bash
# Ensure a Docker engine answers: start it with systemd where the host has it, else run dockerd in
# the background (CI machines and containers have no init). Installs docker.io from Debian if absent.
set -euo pipefail

if ! command -v dockerd >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi

if docker info >/dev/null 2>&1; then
  exit 0
fi

if [ -d /run/systemd/system ]; then
  systemctl start docker
else
  # A dockerd that died leaves containerd's pid file behind; when another process has that pid
  # now, the new dockerd waits for a containerd that is not there and gives up after 60 s.
  pidfile=/var/run/docker/containerd/containerd.pid
  if [ -f "$pidfile" ] && [ "$(ps -o comm= -p "$(cat "$pidfile")" 2>/dev/null)" != containerd ]; then
    rm -f "$pidfile"
  fi
  nohup dockerd >/var/log/dockerd.log 2>&1 &
fi

for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    exit 0
  fi
  sleep 1
done
echo "start-docker: the Docker engine did not answer within 60 s; see /var/log/dockerd.log" >&2
exit 1
