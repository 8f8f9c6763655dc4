#!/usr/bin/env bash
# A rehearsal Ray cluster on this machine: one head and N workers, each a separate `ray start` with its own
# CPU, memory and object-store budget, so that `drugprot tune --address …` and `drugprot serve --address …`
# meet a real multi-node cluster (scheduling across nodes, object transfer, node failure) before a real one.
#
#   infra/local-cluster.sh up [--workers N] [--cpus-per-node C] [--head-cpus C] [--memory-per-node BYTES]
#                             [--object-store-memory BYTES] [--gpus-per-worker G] [--dashboard]
#     --head-cpus C: the CPUs the head declares (default: --cpus-per-node). 0 keeps trials and replicas off the
#     head, as production clusters usually do, so every one of them runs on a worker that can be made to fail.
#     --gpus-per-worker G: each worker declares G GPUs (default 0). Ray schedules by what a node declares, so a
#     CPU-only machine can rehearse fractional-GPU studies (--gpus-per-trial 0.5 with train.device: cpu).
#   infra/local-cluster.sh status
#   infra/local-cluster.sh down [--all]
#
# Environment (the same values must be set for up, status and down):
#   DRUGPROT_RAY_PORT        GCS port of the head (default 6379). Other ports derive from it:
#                            Ray Client PORT+1, dashboard PORT+2, dashboard agents PORT+3+i (node i).
#   RAY_TMPDIR               Ray's temporary folder (default /tmp/drugprot-ray; keep it short: Unix socket paths
#                            under it are limited to 107 characters).
#   RAY_AUTH_MODE            token (default) or disabled. Every Ray process and client must agree: this script
#                            exports one value everywhere and prints what a client must set. With token it uses
#                            RAY_AUTH_TOKEN if set, else the file RAY_AUTH_TOKEN_PATH (default
#                            $RAY_TMPDIR/auth_token, generated with mode 600 if missing).
#   RAY_USAGE_STATS_ENABLED  forced to 0.
#   RAY_CHDIR_TO_TRIAL_DIR   0 unless set: trials keep the nodes' working directory, the repository root.
#
# `down` ends only this cluster: every `ray start` runs in a session of its own (setsid), the session id is recorded
# in $RAY_TMPDIR/drugprot-cluster-PORT.sessions, and down signals the processes of those sessions by pid (TERM,
# then KILL after 5 s). `down --all` is `ray stop --force`, which ends every Ray process of this user on
# the machine, other people's clusters included.
#
# Loopback only: every node's IP is 127.0.0.1, and Ray then binds all its listeners (GCS, raylets, object managers,
# agents, metrics, Ray Client) to 127.0.0.1 instead of the network address or every interface. `ray start` would
# rewrite a requested 127.0.0.1 to the network address (and refuses to add a worker when told not to), so each node
# is started through `ray.scripts.scripts.main` with that rewrite turned off (RAY_START_ON_LOOPBACK). Clients must not
# rewrite it either: they set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which `up` prints with the rest.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

PORT="${DRUGPROT_RAY_PORT:-6379}"
export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/drugprot-ray}"
export RAY_USAGE_STATS_ENABLED=0
# Drivers (count_alive_nodes, `ray status`) keep 127.0.0.1 as it is (see above); ray_start sets 1 for `ray start`.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# Like the KubeRay pods (/app) and the launcher nodes (~/drugprot): Ray starts in the repository and Tune trials stay
# there, so relative paths of run configs (data.dir: data/drugprot) resolve the same way in drivers and trials.
export RAY_CHDIR_TO_TRIAL_DIR="${RAY_CHDIR_TO_TRIAL_DIR:-0}"
ADDRESS="127.0.0.1:${PORT}"
STATE="${RAY_TMPDIR}/drugprot-cluster-${PORT}.sessions"
LOG="${RAY_TMPDIR}/drugprot-cluster-${PORT}.log"

if [[ -x "$REPO/.venv/bin/ray" ]]; then
    RAY="$REPO/.venv/bin/ray"
    PYTHON="$REPO/.venv/bin/python"
elif command -v ray >/dev/null 2>&1; then
    RAY="$(command -v ray)"
    PYTHON="$(dirname "$RAY")/python"
    [[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
else
    echo "local-cluster: no Ray found (neither $REPO/.venv/bin/ray nor ray on PATH); run 'make install' first" >&2
    exit 2
fi

die() { echo "local-cluster: $*" >&2; exit 2; }

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

setup_auth() {
    case "$RAY_AUTH_MODE" in
        disabled) ;;
        token)
            if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
                export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$RAY_TMPDIR/auth_token}"
                if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
                    [[ "${1:-}" == create ]] ||
                        die "RAY_AUTH_MODE=token but $RAY_AUTH_TOKEN_PATH does not exist (was the cluster started with token auth?)"
                    mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
                    (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_AUTH_TOKEN_PATH")
                    echo "generated a Ray auth token in $RAY_AUTH_TOKEN_PATH"
                fi
            fi
            ;;
        *) die "RAY_AUTH_MODE must be 'disabled' or 'token', not '$RAY_AUTH_MODE'" ;;
    esac
}

client_env() {
    local loopback="RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    if [[ "$RAY_AUTH_MODE" == token ]]; then
        if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
            echo "export $loopback RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<the same token>"
        else
            echo "export $loopback RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
        fi
    else
        echo "export $loopback RAY_AUTH_MODE=disabled"
    fi
}

# Alive nodes as seen by a driver connected to the head; prints a number, or fails when the head is unreachable.
# ray.init retries an absent head for minutes, so look at the port first and bound the whole call.
count_alive_nodes() {
    port_in_use "$PORT" || return 1
    timeout -s KILL 60 "$PYTHON" - "$ADDRESS" <<'PY'
import sys
import ray

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
try:
    print(sum(1 for node in ray.nodes() if node["Alive"]))
finally:
    ray.shutdown()
PY
}

# Sessions recorded by `up` (one per `ray start`): the ids, and the processes still in them. The raylet's workers
# take process groups of their own but stay in the session, so a session catches every process of the node.
recorded_sessions() {
    [[ -f "$STATE" ]] || return 0
    awk '$1 ~ /^[0-9]+$/ { print $1 }' "$STATE"
}

session_members() {
    local sessions
    sessions=" $(recorded_sessions | tr '\n' ' ') "
    [[ -n "${sessions// /}" ]] || return 0
    ps -eo pid=,sid= | awk -v s="$sessions" 'index(s, " " $2 " ") { print $1 }'
}

port_in_use() {
    "$PYTHON" - "$1" <<'PY'
import socket, sys
with socket.socket() as s:
    sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
PY
}

# `ray start` with the node on 127.0.0.1: Ray's rewrite of a loopback address to the network address is turned off
# for this one command, and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 lets a worker node join.
RAY_START_ON_LOOPBACK='
import sys
import ray._private.services as services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
main()'

# Start one node in a new session so that its daemons share a process group we can end later.
start_node() {
    local role="$1"; shift
    echo "+ ray start --node-ip-address=127.0.0.1 $*" >>"$LOG"
    setsid env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 "$PYTHON" -c "$RAY_START_ON_LOOPBACK" start \
        --node-ip-address=127.0.0.1 "$@" >>"$LOG" 2>&1 </dev/null &
    local pid=$!
    if ! wait "$pid"; then
        echo "$pid $role" >>"$STATE"
        echo "local-cluster: 'ray start' for the $role failed; its output:" >&2
        tail -n 30 "$LOG" >&2
        cmd_down >/dev/null 2>&1 || true
        exit 1
    fi
    # setsid made ray start the leader of a new session: its pid is the session id of every daemon it started.
    echo "$pid $role" >>"$STATE"
    if [[ -z "$(ps -eo sid= | awk -v s="$pid" '$1 == s')" ]]; then
        echo "local-cluster: no process of the $role is in session $pid; cannot track it for 'down'" >&2
        exit 1
    fi
}

cmd_up() {
    local workers=1 cpus=1 head_cpus="" memory=$((2 * 1024 * 1024 * 1024)) object_store=$((500 * 1024 * 1024)) gpus=0 dashboard=false
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --workers) workers="${2:?--workers needs a value}"; shift 2 ;;
            --cpus-per-node) cpus="${2:?--cpus-per-node needs a value}"; shift 2 ;;
            --head-cpus) head_cpus="${2:?--head-cpus needs a value}"; shift 2 ;;
            --memory-per-node) memory="${2:?--memory-per-node needs a value}"; shift 2 ;;
            --object-store-memory) object_store="${2:?--object-store-memory needs a value}"; shift 2 ;;
            --gpus-per-worker) gpus="${2:?--gpus-per-worker needs a value}"; shift 2 ;;
            --dashboard) dashboard=true; shift ;;
            *) die "up: unknown option $1" ;;
        esac
    done
    head_cpus="${head_cpus:-$cpus}"
    local pair
    for pair in "--workers=$workers" "--cpus-per-node=$cpus" "--head-cpus=$head_cpus" "--memory-per-node=$memory" \
                "--object-store-memory=$object_store" "--gpus-per-worker=$gpus" "DRUGPROT_RAY_PORT=$PORT"; do
        is_uint "${pair#*=}" || die "up: ${pair%%=*} '${pair#*=}' is not a non-negative integer"
    done

    mkdir -p "$RAY_TMPDIR"
    if [[ -n "$(session_members)" ]]; then
        die "a cluster started by this script on port $PORT is still running; run '$0 down' first"
    fi
    if port_in_use "$PORT"; then
        die "port $PORT is already in use (another Ray cluster?); pick another with DRUGPROT_RAY_PORT"
    fi
    setup_auth create
    cd "$REPO"   # the working directory of every raylet, hence of job drivers and trials
    : >"$STATE"
    : >"$LOG"

    local client_port=$((PORT + 1)) dashboard_port=$((PORT + 2))
    echo "starting head on $ADDRESS (RAY_TMPDIR=$RAY_TMPDIR, RAY_AUTH_MODE=$RAY_AUTH_MODE," \
         "$head_cpus CPU, $memory B memory, $object_store B object store)"
    start_node head --head --port="$PORT" \
        --num-cpus="$head_cpus" --num-gpus=0 --memory="$memory" --object-store-memory="$object_store" \
        --include-dashboard="$dashboard" --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" \
        --dashboard-agent-listen-port=$((PORT + 3)) --ray-client-server-port="$client_port" \
        --disable-usage-stats
    local i
    for ((i = 1; i <= workers; i++)); do
        echo "starting worker $i of $workers"
        start_node "worker-$i" --address="$ADDRESS" \
            --num-cpus="$cpus" --num-gpus="$gpus" --memory="$memory" --object-store-memory="$object_store" \
            --dashboard-agent-listen-port=$((PORT + 3 + i)) --disable-usage-stats
    done

    local expected=$((workers + 1)) alive=0 deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
        alive="$(count_alive_nodes 2>/dev/null || echo 0)"
        [[ "$alive" == "$expected" ]] && break
        sleep 1
    done
    if [[ "$alive" != "$expected" ]]; then
        echo "local-cluster: only $alive of $expected nodes came up; see $LOG" >&2
        exit 1
    fi
    echo "cluster up: $alive nodes alive"
    print_usage "$dashboard" "$dashboard_port" "$client_port"
}

print_usage() {
    local dashboard="$1" dashboard_port="$2" client_port="$3"
    cat <<EOF

A client (driver, CLI) on this machine must set:
  $(client_env)
and connect with:
  ray.init(address="$ADDRESS")            # Python
  drugprot tune ... --address $ADDRESS    # or --address auto with RAY_ADDRESS=$ADDRESS
  drugprot serve ... --address $ADDRESS
Ray Client (ray://) is on ray://127.0.0.1:$client_port
EOF
    if [[ "$dashboard" == true ]]; then
        echo "Dashboard (jobs, 'serve deploy', 'serve status'): http://127.0.0.1:$dashboard_port"
    fi
    echo "Stop it with: DRUGPROT_RAY_PORT=$PORT RAY_TMPDIR=$RAY_TMPDIR RAY_AUTH_MODE=$RAY_AUTH_MODE $0 down"
}

cmd_status() {
    [[ $# -eq 0 ]] || die "status takes no options"
    setup_auth
    echo "address: $ADDRESS  RAY_TMPDIR=$RAY_TMPDIR  RAY_AUTH_MODE=$RAY_AUTH_MODE  ($(session_members | wc -l) process(es) started by this script)"
    local alive
    if ! alive="$(count_alive_nodes 2>/dev/null)"; then
        echo "no Ray cluster answers at $ADDRESS"
        return 1
    fi
    echo "nodes alive: $alive"
    timeout -s KILL 30 "$RAY" status --address="$ADDRESS" 2>/dev/null | sed -n '/^Node status/,/^Pending:/p' | grep -v '^Pending:' || true
    echo "client: $(client_env)"
}

cmd_down() {
    local all=false
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --all) all=true; shift ;;
            *) die "down: unknown option $1" ;;
        esac
    done
    if [[ "$all" == true ]]; then
        echo "ray stop --force (every Ray process of this user on this machine)"
        "$RAY" stop --force
        rm -f "$STATE"
        return 0
    fi
    local members
    members="$(session_members | tr '\n' ' ')"
    if [[ -z "${members// /}" ]]; then
        echo "no cluster started by this script on port $PORT is running"
        rm -f "$STATE"
        return 0
    fi
    local nodes
    nodes="$(recorded_sessions | wc -l)"
    # shellcheck disable=SC2086
    kill -TERM $members 2>/dev/null || true
    local deadline=$((SECONDS + 5))
    while ((SECONDS < deadline)) && [[ -n "$(session_members)" ]]; do sleep 0.5; done
    members="$(session_members | tr '\n' ' ')"
    # shellcheck disable=SC2086
    [[ -z "${members// /}" ]] || kill -KILL $members 2>/dev/null || true
    deadline=$((SECONDS + 5))
    while ((SECONDS < deadline)) && [[ -n "$(session_members)" ]]; do sleep 0.2; done
    if [[ -n "$(session_members)" ]]; then
        echo "local-cluster: processes survived: $(session_members | tr '\n' ' ')" >&2
        return 1
    fi
    rm -f "$STATE"
    echo "cluster on port $PORT stopped ($nodes node(s))"
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    status) shift; cmd_status "$@" ;;
    down) shift; cmd_down "$@" ;;
    *)
        sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
