#!/usr/bin/env bash
# The aarch64 drill: the device as deployed on a Jetson or a Raspberry Pi, with only the CPU emulated.
#
#   sudo scripts/arm64_drill.sh            (or: make drill-arm64; needs root, `make setup` done)
#
# 1. A minimal Debian bookworm arm64 root filesystem (debootstrap, Python 3.11 as on the pins),
#    cached in $SFLAM_ARM64_CACHE (default /var/cache/sflam/arm64) and reused by later runs;
#    qemu-user-static runs its binaries through binfmt_misc.
# 2. The edge extra's aarch64 wheels are downloaded here (pip download --platform, markers
#    evaluated for linux-aarch64) next to a wheel of this checkout; sshd starts inside the root on
#    a free 127.0.0.1 port.
# 3. `sflam flash` copies a bundle there over ssh, installs sflam[edge] from those wheels into a
#    venv with the device's own pip, and runs `launch.sh --check` there.
# 4. A 2-round `sflam server` run over a private mosquitto on loopback with two x86 `sflam device`
#    processes and one aarch64 device started over ssh inside the root; the server's metrics must
#    count the aarch64 device's update in both rounds.
# 5. The footprint benchmark's device clients for ViT-B/32 batch 8 run inside the root (ORT).
#
# Every step prints its wall time; the last line says PASS or FAIL. Only loopback is used; the
# root's packages come from debootstrap's default mirror and the wheels from pip's configured
# index. Known: /sys is not mounted inside (ONNX Runtime's cpuinfo then reads the host's CPU and
# crashes under qemu); LiteRT 1.4.0's forward crashes under qemu-user 7.2 (edge_runtime/platforms.py),
# which step 3 records without failing.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${SFLAM_PYTHON:-$REPO/.venv/bin/python}
SFLAM="$PY -m sflam"
CACHE=${SFLAM_ARM64_CACHE:-/var/cache/sflam/arm64}
SUITE=bookworm
ROOTFS=$CACHE/rootfs-$SUITE
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sflam-arm64-drill.XXXXXX")
REMOTE=/opt/sflam-drill
ROUNDS=2
START=$(date +%s)
PIDS=()

say() { printf '[%4ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }
fail() { say "FAIL: $*"; exit 1; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 1
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  for mnt in dev/pts dev proc; do
    mountpoint -q "$ROOTFS/$mnt" 2>/dev/null && umount -l "$ROOTFS/$mnt" || true
  done
  rm -rf "${ROOTFS:?}$REMOTE"
  if [ "$rc" != 0 ]; then
    say "logs kept in $WORK"
    for log in "$WORK"/*.log; do [ -f "$log" ] && { echo "--- $log (tail)"; tail -n 25 "$log"; }; done
    echo "FAIL"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || fail "run as root (debootstrap, chroot and binfmt_misc need it)"
[ -x "$PY" ] || fail "no $PY: run \`make setup\` first"

# --- 1. tools, binfmt and the cached root filesystem ------------------------------------------
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]} with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >"$WORK/apt.log" 2>&1 \
    || { apt-get update -q >>"$WORK/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >>"$WORK/apt.log" 2>&1; } \
    || fail "apt-get install ${need[*]} failed (see $WORK/apt.log)"
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
  || fail "qemu-aarch64 is not registered with binfmt_misc (flag F); try: update-binfmts --enable qemu-aarch64"

if [ ! -f "$ROOTFS/.sflam-ready" ]; then
  say "debootstrap: a minimal $SUITE arm64 root in $ROOTFS (first run only; minutes)"
  rm -rf "$ROOTFS.partial"
  mkdir -p "$CACHE"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,openssh-server,ca-certificates "$SUITE" "$ROOTFS.partial" \
    >"$WORK/debootstrap.log" 2>&1 || fail "debootstrap failed (see $WORK/debootstrap.log)"
  chroot "$ROOTFS.partial" ssh-keygen -A >/dev/null
  rm -rf "$ROOTFS"
  mv "$ROOTFS.partial" "$ROOTFS"
  touch "$ROOTFS/.sflam-ready"
else
  say "root filesystem: cached $ROOTFS"
fi
mount -t proc proc "$ROOTFS/proc"
mount --bind /dev "$ROOTFS/dev"
mkdir -p "$ROOTFS/run/sshd" "$ROOTFS/root/.ssh"
say "inside: uname -m = $(chroot "$ROOTFS" uname -m), $(chroot "$ROOTFS" python3 --version)"
[ "$(chroot "$ROOTFS" uname -m)" = aarch64 ] || fail "the root does not run as aarch64"

# --- 2. aarch64 wheels, and sshd inside the root ----------------------------------------------
say "wheels: sflam from this checkout, the edge extra for linux-aarch64 / CPython 3.11"
mkdir -p "$WORK/wheels"
"$PY" -m pip wheel -q --no-deps -w "$WORK/wheels" "$REPO" >"$WORK/wheel.log" 2>&1 || fail "building the sflam wheel failed"
"$PY" - "$REPO/pyproject.toml" >"$WORK/edge-aarch64.txt" <<'EOF'
import sys, tomllib
from packaging.requirements import Requirement
target = {"sys_platform": "linux", "platform_machine": "aarch64", "platform_system": "Linux",
          "python_version": "3.11", "python_full_version": "3.11.2", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
with open(sys.argv[1], "rb") as handle:
    edge = tomllib.load(handle)["project"]["optional-dependencies"]["edge"]
for line in edge:
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate(target):
        print(f"{req.name}{req.specifier}")
EOF
say "edge extra on linux-aarch64: $(tr '\n' ' ' <"$WORK/edge-aarch64.txt")"
"$PY" -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64 \
  --platform manylinux2014_aarch64 --platform any -d "$WORK/wheels" -r "$WORK/edge-aarch64.txt" \
  >"$WORK/download.log" 2>&1 || fail "pip download of the aarch64 wheels failed (see $WORK/download.log)"

ssh-keygen -q -t ed25519 -N "" -f "$WORK/id" -C sflam-drill
cp "$WORK/id.pub" "$ROOTFS/root/.ssh/authorized_keys"
SSH_PORT=$(free_port)
cat >"$ROOTFS/etc/ssh/sflam_drill_sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $SSH_PORT
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile /run/sflam-drill-sshd.pid
AuthorizedKeysFile /root/.ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
EOF
chroot "$ROOTFS" /usr/sbin/sshd -D -e -f /etc/ssh/sflam_drill_sshd_config >"$WORK/sshd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 120); do grep -q "Server listening" "$WORK/sshd.log" && break; sleep 0.5; done
grep -q "Server listening" "$WORK/sshd.log" || fail "sshd inside the root did not start"
SSH=(ssh -F /dev/null -p "$SSH_PORT" -i "$WORK/id" -o BatchMode=yes -o IdentitiesOnly=yes
     -o StrictHostKeyChecking=accept-new -o "UserKnownHostsFile=$WORK/known_hosts" root@127.0.0.1)
say "sshd (aarch64) on 127.0.0.1:$SSH_PORT; over ssh: uname -m = $("${SSH[@]}" uname -m)"

# --- 3. export and flash ------------------------------------------------------------------------
say "export: vit_quick_patch4_16 for jetson-orin-nano (onnx + tflite, batch 16)"
$SFLAM export --model vit_quick_patch4_16 --profile jetson-orin-nano --formats onnx,tflite --batch 16 \
  --out "$WORK/bundle" >"$WORK/export.log" 2>&1 || fail "export failed"
grep -E "target platform|note:" "$WORK/export.log" | sed 's/^/    /'
say "flash: ssh://root@127.0.0.1:$SSH_PORT$REMOTE/bundle (venv + pip install from the aarch64 wheels, then launch.sh --check)"
$SFLAM flash --bundle "$WORK/bundle" --target "ssh://root@127.0.0.1:$SSH_PORT$REMOTE/bundle" \
  --identity "$WORK/id" --known-hosts "$WORK/known_hosts" --ssh-config /dev/null --no-unit \
  --wheel "$WORK"/wheels/*.whl --pip-arg=--no-index --pip-arg=--no-compile 2>&1 | tee "$WORK/flash.log" | sed 's/^/    /'
grep -q '^done: ' "$WORK/flash.log" || fail "sflam flash failed"
grep -q 'forward check: ok {"backend": "onnx"' "$WORK/flash.log" || fail "launch.sh --check did not pass on onnx"
"${SSH[@]}" "$REMOTE/bundle/.venv/bin/python -m pip list --format=freeze 2>/dev/null" \
  | grep -E -i '^(numpy|onnxruntime|ai-edge-litert|paho-mqtt|safetensors|sflam)==' | sed 's/^/    installed: /'
if "${SSH[@]}" "cd $REMOTE/bundle && ./launch.sh --check --backend litert" >"$WORK/litert.log" 2>&1; then
  say "launch.sh --check --backend litert: ok"
else
  say "launch.sh --check --backend litert: failed (exit $?, known under qemu-user: edge_runtime/platforms.py): $(grep -v cpuinfo "$WORK/litert.log" | tail -n 1)"
fi

# --- 4. a 2-round run: two x86 devices and the aarch64 one --------------------------------------
BROKER_PORT=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n' "$BROKER_PORT" >"$WORK/mosquitto.conf"
"$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
PIDS+=($!)
BROKER=mqtt://127.0.0.1:$BROKER_PORT
"$PY" -c "from server_runtime.data.datasets import write_digits_shards; write_digits_shards('$WORK', 3, 96, stem='shard')"
"${SSH[@]}" "cat > $REMOTE/shard-2.npz" <"$WORK/shard-2.npz"
cat >"$WORK/run.toml" <<EOF
seed = 0
[model]
preset = "vit_quick_patch4_16"
[training]
rounds = $ROUNDS
devices_per_round = 3
batch_size = 16
lr = 0.05
[quant]
bits = 8
[round]
deadline_s = 600.0
min_completed = 1.0
wait_for_devices_s = 600.0
[broker]
url = "$BROKER"
run_id = "drill"
[checkpoint]
dir = "$WORK/run"
[compute]
device = "cpu"
workers = 2
EOF
say "run: sflam server ($ROUNDS rounds, 3 devices per round) on $BROKER"
$SFLAM server --config "$WORK/run.toml" >"$WORK/server.log" 2>&1 &
SERVER=$!
PIDS+=($SERVER)
for d in 0 1; do
  $SFLAM device --bundle "$WORK/bundle" --broker "$BROKER" --device-id "x86-$d" --run-id drill \
    --data "npz:$WORK/shard-$d.npz" --rounds $ROUNDS --meter estimate >"$WORK/x86-$d.log" 2>&1 &
  PIDS+=($!)
done
"${SSH[@]}" "cd $REMOTE/bundle && echo \"inside: \$(uname -m)\" && ./launch.sh --broker $BROKER --device-id arm64-0 \
  --run-id drill --data npz:$REMOTE/shard-2.npz --rounds $ROUNDS --meter estimate" >"$WORK/arm64.log" 2>&1 &
ARM=$!
PIDS+=($ARM)
wait "$SERVER" || fail "sflam server exited with $?"
wait "$ARM" || fail "the aarch64 device exited with $?"
grep '^inside: ' "$WORK/arm64.log" | sed 's/^/    /'
"$PY" - "$WORK/run/metrics.jsonl" "$WORK/arm64.log" $ROUNDS <<'EOF' || fail "the aarch64 device's updates were not counted"
import json, sys
records = [r for r in map(json.loads, open(sys.argv[1])) if r.get("event") == "round"]
summary = next(json.loads(l.split(" ", 1)[1]) for l in open(sys.argv[2]) if l.startswith("sflam-device-summary "))
for r in records:
    print(f"    round {r['round']}: counted {r['counted']}, completed {', '.join(r['completed'])}, "
          f"accuracy {r.get('accuracy')}")
counted = [r for r in records if r["counted"] and "arm64-0" in r["completed"]]
print(f"    aarch64 device: backend {summary['backend']}, rounds {summary['rounds']}, peak RSS {summary['peak_rss_mib']} MiB "
      f"(qemu's own memory included), torch loaded: {summary['torch_loaded']}")
sys.exit(0 if len(counted) == int(sys.argv[3]) and summary["rounds"] == int(sys.argv[3]) else 1)
EOF
say "run: the server counted the aarch64 device's update in all $ROUNDS rounds"

# --- 5. footprint of ViT-B/32 batch 8 inside the root ------------------------------------------
if [ "${SFLAM_DRILL_FOOTPRINT:-1}" = 1 ]; then
  say "footprint: export vit_base_patch32_224 (onnx, batch 8) and run the device clients inside"
  $SFLAM export --model vit_base_patch32_224 --profile jetson-orin-nano --formats onnx --batch 8 \
    --out "$WORK/vitb32" >"$WORK/export-b32.log" 2>&1 || fail "ViT-B/32 export failed"
  "${SSH[@]}" "mkdir -p $REMOTE/vitb32 $REMOTE/benchmarks"
  tar -C "$WORK/vitb32" -cf - . | "${SSH[@]}" "tar -xf - -C $REMOTE/vitb32"
  "${SSH[@]}" "cat > $REMOTE/benchmarks/bench_edge_footprint.py" <"$REPO/benchmarks/bench_edge_footprint.py"
  "${SSH[@]}" "cd $REMOTE && bundle/.venv/bin/python benchmarks/bench_edge_footprint.py --bundle vitb32 \
    --clients floor,onnx,loop --steps 3 --broker $BROKER --skip-install-size" >"$WORK/footprint.log" 2>&1 \
    || fail "the footprint clients failed inside the root"
  sed -n '/^(1, 2)/,/^torch never/p' "$WORK/footprint.log" | sed 's/^/    /'
fi
say "PASS: aarch64 (emulated) bundle checked, sflam[edge] installed from aarch64 wheels, device counted in $ROUNDS rounds"
echo "PASS"
