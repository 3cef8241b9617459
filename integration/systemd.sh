#!/usr/bin/env bash
# The shipped units under a real systemd: a Debian root booted with `systemd-nspawn -b` (its own
# network namespace: loopback only), autosleepd installed in /opt/autosleepd as the README says,
# vllm@sim from the shipped vllm@.service running the simulator, autosleepd@sim in front.
# Checks READY, STATUS, the watchdog, and requests held across vLLM restarts. Exit 77 when a
# piece is missing.
set -euo pipefail
PART=systemd
source "$(dirname "$0")/common.sh"

need systemd-nspawn "apt-get install systemd-container"
need nsenter "apt-get install util-linux"
[ "$(id -u)" = 0 ] || skip "systemd-nspawn needs root"

debian_root systemd "" systemd,systemd-sysv,dbus,python3,python3-venv,curl
base=$ROOTFS
wheelhouse
run=$CACHE/systemd-run
cleanup=()
# Undone in reverse order on any exit.
trap 'for ((i = ${#cleanup[@]} - 1; i >= 0; i--)); do eval "${cleanup[i]}" || true; done' EXIT

# A fresh copy of the cached root each run, with autosleepd installed as the README shows.
rm -rf "$run" && cp -a "$base" "$run"
mkdir -p "$run/tmp/wheels" && cp "$WHEELS"/*.whl "$run/tmp/wheels/"
chroot "$run" env -i PATH=/usr/bin:/bin sh -c 'python3 -m venv /opt/autosleepd &&
    /opt/autosleepd/bin/pip install -q --no-index --find-links /tmp/wheels autosleepd' \
    || fail "installing autosleepd in the root failed"
install -m 644 "$ROOT_DIR/systemd/autosleepd@.service" "$ROOT_DIR/systemd/vllm@.service" "$run/etc/systemd/system/"
mkdir -p "$run/etc/autosleepd" "$run/etc/vllm" "$run/etc/systemd/system/vllm@.service.d" \
    "$run/etc/systemd/system/autosleepd@.service.d" "$run/opt/it"
# vllm@sim is the shipped vllm@.service; only its command is the simulator's.
cat > "$run/etc/systemd/system/vllm@.service.d/simulator.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=/opt/autosleepd/bin/autosleepd sim --host 127.0.0.1 --port ${VLLM_PORT} --model ${VLLM_MODEL} --load 2s --token 20ms
EOF
printf 'VLLM_MODEL=model\nVLLM_PORT=8000\nVLLM_ARGS=\n' > "$run/etc/vllm/sim.env"
token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
sed -e "s/^AUTOSLEEPD_ADMIN_TOKEN=.*/AUTOSLEEPD_ADMIN_TOKEN=$token/" -e "s/^AUTOSLEEPD_IDLE_TIMEOUT=.*/AUTOSLEEPD_IDLE_TIMEOUT=3s/" \
    "$ROOT_DIR/systemd/autosleepd.env.example" > "$run/etc/autosleepd/sim.env"
echo AUTOSLEEPD_PROBE_INTERVAL=1s >> "$run/etc/autosleepd/sim.env"
chmod 640 "$run/etc/autosleepd/sim.env"
# The README's recipe for an existing vLLM unit with another name: my-llm.service, fronted by
# autosleepd@other through a drop-in.
cat > "$run/etc/systemd/system/my-llm.service" <<'EOF'
[Service]
ExecStart=/opt/autosleepd/bin/autosleepd sim --host 127.0.0.1 --port 8001 --model model
[Install]
WantedBy=multi-user.target
EOF
printf 'AUTOSLEEPD_UPSTREAM=http://127.0.0.1:8001\nAUTOSLEEPD_PORT=8081\n' > "$run/etc/autosleepd/other.env"
mkdir -p "$run/etc/systemd/system/autosleepd@other.service.d"
printf '[Unit]\nAfter=my-llm.service\n' > "$run/etc/systemd/system/autosleepd@other.service.d/vllm.conf"
cp "$ROOT_DIR/integration/scenario.py" "$ROOT_DIR/integration/workers.py" "$run/opt/it/"

# Where the host is not run by systemd (no D-Bus, /run not a tmpfs), nspawn needs its own tmpfs
# for what it propagates into the container, and must stay in the caller's cgroup.
if ! mountpoint -q /run/systemd/nspawn && [ "$(stat -f -c %T /run)" != tmpfs ]; then
    mkdir -p /run/systemd/nspawn && mount -t tmpfs tmpfs /run/systemd/nspawn
    cleanup+=("umount /run/systemd/nspawn")
fi
say "booting the root: systemd-nspawn -b --private-network --register=no --keep-unit"
systemd-nspawn -q -b -D "$run" --private-network --register=no --keep-unit --console=pipe \
    > "$CACHE/nspawn.log" 2>&1 < /dev/null &
nspawn=$!
cleanup+=("kill -TERM $nspawn; wait $nspawn")
leader=""
for _ in $(seq 100); do
    # The container's init: nspawn's child named systemd (a short-lived helper child may come first).
    leader=$(ps -o pid=,comm= --ppid "$nspawn" | awk '$2 == "systemd" {print $1; exit}' || true)
    [ -n "$leader" ] && break; sleep 0.1
done
[ -n "$leader" ] || fail "the container did not start: see $CACHE/nspawn.log"
inside() { nsenter -t "$leader" -m -u -i -n -p -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
for _ in $(seq 300); do
    state=$(inside systemctl is-system-running 2>/dev/null || true)
    case $state in running|degraded) break ;; esac; sleep 0.2
done
say "booted: $(inside systemctl --version | head -1), state $state"
cleanup+=("inside systemctl poweroff")

inside systemctl enable -q --now vllm@sim.service autosleepd@sim.service || fail "enable --now failed"
show() { inside systemctl show -p "$2" --value "$1"; }
[ "$(show autosleepd@sim ActiveState)/$(show autosleepd@sim SubState)" = active/running ] \
    || fail "autosleepd@sim is not active: $(inside journalctl -u autosleepd@sim -n 20 -o cat)"
say "READY: autosleepd@sim is active (Type=notify), status: \"$(show autosleepd@sim StatusText)\""
say "runs as uid $(inside stat -c %u "/proc/$(show autosleepd@sim MainPID)") (DynamicUser=yes)"

echo "$token" > "$run/opt/it/token"
inside python3 -u /opt/it/scenario.py http://127.0.0.1:8080 --token-file /opt/it/token --idle 3 \
    --restart "systemctl restart vllm@sim" \
    --crash "systemctl kill -s KILL vllm@sim; while systemctl -q is-active vllm@sim; do sleep 0.1; done" \
    --sidecar "systemctl show -p MainPID -p NRestarts --value autosleepd@sim | paste -sd ' '" \
    | sed -u "s/^/[$PART] /" || fail "the scenario failed: $(inside journalctl -u autosleepd@sim -n 30 -o cat)"
say "STATUS after the restarts: \"$(show autosleepd@sim StatusText)\""

# The existing-unit recipe: my-llm.service fronted through the README's drop-in.
inside systemctl enable -q --now my-llm.service autosleepd@other.service || fail "the existing-unit recipe failed"
for _ in $(seq 100); do
    inside curl -sf -o /dev/null http://127.0.0.1:8081/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "model", "prompt": "x", "max_tokens": 1}' && break; sleep 0.1
done || true
inside curl -sf -o /dev/null http://127.0.0.1:8081/v1/completions -H 'Content-Type: application/json' \
    -d '{"model": "model", "prompt": "x", "max_tokens": 1}' || fail "autosleepd@other does not serve my-llm"
say "existing-unit recipe: autosleepd@other (drop-in After=my-llm.service) serves my-llm.service"

# The watchdog: a frozen event loop is killed and restarted. WatchdogSec is shortened to 3s by
# a drop-in so the check takes seconds; the mechanism is the shipped one.
printf '[Service]\nWatchdogSec=3s\n' > "$run/etc/systemd/system/autosleepd@.service.d/it-watchdog.conf"
inside systemctl daemon-reload && inside systemctl restart autosleepd@sim
before=$(show autosleepd@sim MainPID)
inside kill -STOP "$before"
started=$SECONDS
until [ "$(show autosleepd@sim MainPID)" != "$before" ] && [ "$(show autosleepd@sim SubState)" = running ]; do
    [ $((SECONDS - started)) -lt 90 ] || fail "the watchdog did not restart a frozen autosleepd"
    sleep 0.2
done
until inside journalctl -u autosleepd@sim -o cat | grep -q "Watchdog timeout"; do   # the journal may lag
    [ $((SECONDS - started)) -lt 60 ] || { inside journalctl -u autosleepd@sim -o cat | tail -20
                                           fail "no watchdog timeout in the journal"; }
    sleep 0.5
done
say "watchdog: a frozen autosleepd (SIGSTOP) was killed and restarted in $((SECONDS - started))s (pid $before -> $(show autosleepd@sim MainPID))"

started=$SECONDS
inside systemctl stop autosleepd@sim
say "systemctl stop autosleepd@sim: $(show autosleepd@sim Result) in $((SECONDS - started))s; vllm@sim still $(show vllm@sim ActiveState)"

# Worker processes: autosleepd@workers, the same settings with AUTOSLEEPD_WORKERS=2, in front of
# vllm@sim now that autosleepd@sim is stopped. `systemctl stop` sends SIGTERM to every process
# of the unit; nothing may be left for SIGKILL.
unit_processes() { inside sh -c "grep -l '/$1.service\$' /proc/[0-9]*/cgroup 2>/dev/null | wc -l"; }
{ cat "$run/etc/autosleepd/sim.env"; printf 'AUTOSLEEPD_WORKERS=2\nAUTOSLEEPD_PORT=8082\n'; } > "$run/etc/autosleepd/workers.env"
chmod 640 "$run/etc/autosleepd/workers.env"
inside systemctl start autosleepd@workers || fail "autosleepd@workers did not start: $(inside journalctl -u autosleepd@workers -n 20 -o cat)"
say "READY: autosleepd@workers is $(show autosleepd@workers ActiveState), $(unit_processes autosleepd@workers) processes in its cgroup"
inside python3 -u /opt/it/scenario.py http://127.0.0.1:8082 --token-file /opt/it/token --idle 3 \
    --restart "systemctl restart vllm@sim" \
    --crash "systemctl kill -s KILL vllm@sim; while systemctl -q is-active vllm@sim; do sleep 0.1; done" \
    --sidecar "systemctl show -p MainPID -p NRestarts --value autosleepd@workers | paste -sd ' '" \
    | sed -u "s/^/[$PART] /" || fail "the scenario with workers failed: $(inside journalctl -u autosleepd@workers -n 30 -o cat)"
inside python3 -u /opt/it/workers.py http://127.0.0.1:8082 --token-file /opt/it/token --processes 2 \
    --stop "systemctl stop autosleepd@workers" --exit-code "systemctl show -p ExecMainStatus --value autosleepd@workers" \
    | sed -u "s/^/[$PART] /" || fail "workers.py failed: $(inside journalctl -u autosleepd@workers -n 30 -o cat)"
killed=$(inside journalctl -u autosleepd@workers -o cat | grep -E "SIGKILL|Killing process|stop-sigterm' timed out|left-over" || true)
[ -z "$killed" ] || fail "systemd had to kill processes of autosleepd@workers: $killed"
[ "$(show autosleepd@workers Result)" = success ] || fail "autosleepd@workers stopped with result $(show autosleepd@workers Result)"
say "systemctl stop autosleepd@workers: success, every process exited on SIGTERM (no SIGKILL in the journal)"
# A restart (how settings are applied: there is no reload) replaces the owner and its workers.
inside systemctl start autosleepd@workers
before=$(show autosleepd@workers MainPID)
reload=$(inside systemctl reload autosleepd@workers 2>&1) && fail "systemctl reload succeeded, but autosleepd has no reload"
started=$SECONDS
inside systemctl restart autosleepd@workers
after=$(show autosleepd@workers MainPID)
procs=$(unit_processes autosleepd@workers)
[ "$after" != "$before" ] && [ "$procs" = 2 ] || fail "after a restart: MainPID $before -> $after, $procs processes"
inside curl -sf -o /dev/null http://127.0.0.1:8082/v1/completions -H 'Content-Type: application/json' \
    -d '{"model": "model", "prompt": "x", "max_tokens": 1}' || fail "autosleepd@workers does not serve after a restart"
say "systemctl restart autosleepd@workers: $((SECONDS - started))s, owner $before -> $after with its worker, serving; systemctl reload is refused (${reload##*: })"
inside systemctl stop autosleepd@workers
say "PASS"
