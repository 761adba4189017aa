#!/usr/bin/env bash
# Make sure the tools of kernel links (`sflam simulate --network netem`) are there: ip and tc
# (iproute2) and iptables, installed with apt-get as root when missing. The demo does not need
# them; the netem tests do. Never fails the build: without them `--network netem` is refused
# with a message naming what is missing, and the netem tests fail saying the same.
set -u
missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v tc >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
if [ ${#missing[@]} -eq 0 ]; then
  echo "==> netem: ip, tc and iptables found"
  exit 0
fi
packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> netem: installing ${packages}with apt-get"
  # shellcheck disable=SC2086
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -q $packages >/dev/null 2>&1 \
     || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $packages >/dev/null 2>&1; }; then
    echo "==> netem: ${packages}installed"
    exit 0
  fi
fi
echo "==> netem: ${packages}unavailable; sflam simulate --network netem will be refused"
exit 0
