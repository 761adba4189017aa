#!/usr/bin/env bash
# Make sure a broker binary is available: mosquitto when installed or installable (as root),
# else say that sflam falls back to its embedded amqtt broker. Never fails the build.
set -u
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  echo "==> broker: mosquitto found"
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> broker: installing mosquitto with apt-get"
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto >/dev/null 2>&1 \
     || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto >/dev/null 2>&1; }; then
    # The Debian package may start a system broker on 1883; sflam never relies on it.
    echo "==> broker: mosquitto installed"
    exit 0
  fi
fi
echo "==> broker: mosquitto unavailable; sflam will use the embedded amqtt broker (slower)"
exit 0
