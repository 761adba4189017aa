#!/usr/bin/env bash
# Make sure an sshd binary is available for the `sflam flash` end-to-end test, which starts its
# own sshd on a free 127.0.0.1 port. Installs openssh-server when missing (as root, with apt-get)
# and stops any system sshd the package starts: nothing may listen on port 22 afterwards.
# Never fails set-up itself; without sshd the ssh flash tests fail and say why (the suite allows no
# skips but CUDA-only ones).
set -u
if [ -x /usr/sbin/sshd ]; then
  echo "==> sshd: found"
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> sshd: installing openssh-server with apt-get"
  install_sshd() {
    # RUNLEVEL=1 asks invoke-rc.d not to start services from the package's postinst.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -q openssh-server >/dev/null 2>&1
  }
  if install_sshd || { apt-get update -q >/dev/null 2>&1 && install_sshd; }; then
    # Best effort: the postinst may still have started a system sshd on port 22.
    service ssh stop >/dev/null 2>&1 || true
    if [ -s /run/sshd.pid ]; then
      kill "$(cat /run/sshd.pid)" >/dev/null 2>&1 || true
    fi
    echo "==> sshd: openssh-server installed (system sshd not left running)"
    exit 0
  fi
fi
echo "==> sshd: unavailable; the ssh flash tests will fail (they need /usr/sbin/sshd)"
exit 0
