#!/usr/bin/env bash
# Install Debian packages the controller needs, once. `lab` needs the container tooling; `test`
# also needs the real servers the application tests start on loopback, and the headless browser
# that the default scenario drives through Flower's proxy.
set -euo pipefail

lab=(docker.io debootstrap python3-venv python3-pip make git curl)
test=(redis-server postgresql dovecot-imapd prometheus chromium)

case "${1:-lab}" in
  lab) wanted=("${lab[@]}") ;;
  test) wanted=("${lab[@]}" "${test[@]}") ;;
  *) echo "usage: $0 lab|test" >&2; exit 2 ;;
esac

missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

# Package scripts must not start services on the controller: the tests start their own instances.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT

apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "installed: ${missing[*]}"
