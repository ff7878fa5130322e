#!/usr/bin/env bash
# The compose proof on a machine with podman and no registry (run as root; `make compose-test`).
#
# 1. a base image: debootstrap a minimal Debian bookworm with Python 3.11, `podman import` it;
# 2. wheels: the project's pinned dependencies downloaded into deploy/wheels (offline builds);
# 3. images: the five services (inference as VARIANT=lite: the transformers engine, no vLLM) and
#    stand-ins for the NATS and PostgreSQL images (deploy/compose/local), all FROM that base;
# 4. `podman-compose up` of deploy/compose/docker-compose.yml (profile cpu) with throw-away
#    credentials and the arithmetic example shortened by environment overrides;
# 5. waits until the ledger has trainer steps and trained trajectories, checks that no credential
#    appears in any container's log, prints the ledger summary and `PROOF OK`; takes it all down.
#
# Podman as root here needs runc, cgroupfs and explicit ulimits (deploy/README.md); healthchecks
# are run by this script (`podman healthcheck run`), since no systemd runs podman's timers.
# Environment: PROOF_STEPS (trainer steps to wait for, default 3), PROOF_TIMEOUT_S (default 2400),
# PROOF_KEEP=1 (leave the stack up), PROOF_SFT_STEPS (warm-start steps, default 30).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=$ROOT/build/compose-proof
mkdir -p "$WORK"
STEPS=${PROOF_STEPS:-3}
TIMEOUT_S=${PROOF_TIMEOUT_S:-2400}
BASE=localhost/offbeat-base:bookworm
TAG=proof
PROJECT=offbeat-proof
VENV_BIN=$ROOT/.venv/bin
say() { printf '[proof %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# --- tools ---------------------------------------------------------------------------------------
missing=()
for tool in podman debootstrap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman debootstrap runc
fi
COMPOSE=("$VENV_BIN/podman-compose")
[[ -x ${COMPOSE[0]} ]] || COMPOSE=(podman-compose)
cat > "$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=16384:16384", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs --events-backend file)

# --- 1. base image -------------------------------------------------------------------------------
if ! "${PODMAN[@]}" image exists "$BASE"; then
  if [[ ! -x $WORK/rootfs/usr/bin/python3 ]]; then
    say "debootstrap bookworm (python3, venv, bubblewrap, wget) into $WORK/rootfs"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,bubblewrap,libseccomp2,wget,ca-certificates \
      bookworm "$WORK/rootfs" http://deb.debian.org/debian > "$WORK/debootstrap.log"
  fi
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  say "podman import -> $BASE"
  tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - "$BASE" >/dev/null
fi

# --- 2. wheels -----------------------------------------------------------------------------------
if ! ls deploy/wheels/torch-*.whl >/dev/null 2>&1; then
  say "downloading the pinned dependencies into deploy/wheels"
  "$VENV_BIN/pip" freeze --exclude-editable | grep -v -E '^(-e |offbeat)' > "$WORK/requirements.txt"
  "$VENV_BIN/pip" download -q --no-deps -d deploy/wheels -r "$WORK/requirements.txt" pip setuptools wheel
  for sdist in deploy/wheels/*.tar.gz; do
    [[ -e $sdist ]] || continue
    "$VENV_BIN/pip" wheel -q --no-deps -w deploy/wheels "$sdist" && rm -f "$sdist"
  done
fi

# --- 3. images -----------------------------------------------------------------------------------
build() {  # build <tag> <dockerfile> [build args...]
  local tag=$1 file=$2
  shift 2
  local t0=$SECONDS
  "${PODMAN[@]}" build --format docker --layers -q -f "$file" --build-arg BASE_IMAGE="$BASE" --build-arg PIP_EXTRA_ARGS=--no-index \
    --ulimit nofile=16384:16384 --ulimit nproc=4096:4096 "$@" -t "$tag" . > "$WORK/build-${tag//[:\/]/_}.log" 2>&1 \
    || { tail -40 "$WORK/build-${tag//[:\/]/_}.log"; say "build of $tag failed"; exit 1; }
  say "built $tag in $((SECONDS - t0))s"
}
build offbeat-nats-local:$TAG deploy/compose/local/nats.Dockerfile
build offbeat-postgres-local:$TAG deploy/compose/local/postgres.Dockerfile
build offbeat-orchestrator:$TAG services/orchestrator/Dockerfile
build offbeat-scorer:$TAG services/scorer/Dockerfile
build offbeat-sandbox:$TAG services/sandbox/Dockerfile
build offbeat-trainer:$TAG-cpu services/trainer/Dockerfile --build-arg VARIANT=cpu --build-arg TORCH_INDEX_URL=
build offbeat-inference:$TAG-cpu services/inference/Dockerfile --build-arg VARIANT=lite --build-arg TORCH_INDEX_URL=
"${PODMAN[@]}" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "offbeat-.*:$TAG" | sed 's/^/  /'

# --- 4. up ---------------------------------------------------------------------------------------
rand() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
NATS_PW=$(rand) PG_PW=$(rand) ADMIN=$(rand)
cat > "$WORK/proof.env" <<EOF
OFFBEAT_NATS_PASSWORD=$NATS_PW
OFFBEAT_POSTGRES_PASSWORD=$PG_PW
OFFBEAT_ADMIN_TOKEN=$ADMIN
OFFBEAT_TAG=$TAG
OFFBEAT_NATS_IMAGE=localhost/offbeat-nats-local:$TAG
OFFBEAT_POSTGRES_IMAGE=localhost/offbeat-postgres-local:$TAG
OFFBEAT_ADMIN_PORT=${PROOF_ADMIN_PORT:-55151}
EOF
chmod 600 "$WORK/proof.env"
# The same run file, shortened for two cores: a few steps, and a short warm start if it has one.
cat > "$WORK/proof.override.yml" <<EOF
x-short: &short
  OFFBEAT__RUN__MAX_STEPS: "$STEPS"
services:
  prepare-model:
    environment:
      <<: *short
  orchestrator: {environment: {<<: *short}}
  trainer: {environment: {<<: *short}}
EOF
COMPOSE_FILE=deploy/compose/docker-compose.yml
if [[ -n ${PROOF_RUN_CONFIG:-} ]]; then  # try another run file (the proof itself uses the example)
  COMPOSE_FILE=deploy/compose/.proof.docker-compose.yml
  sed "s#source: ../../examples/arithmetic.toml#source: $(realpath "$PROOF_RUN_CONFIG")#" \
    deploy/compose/docker-compose.yml > "$COMPOSE_FILE"
  say "run config: $PROOF_RUN_CONFIG (not examples/arithmetic.toml)"
fi
DC=("${COMPOSE[@]}" -p "$PROJECT" --env-file "$WORK/proof.env" -f "$COMPOSE_FILE" -f "$WORK/proof.override.yml" --profile cpu)
down() { "${DC[@]}" down -v -t 20 > "$WORK/down.log" 2>&1 || true; }
down
HEALTH_PID=
cleanup() {
  [[ -n $HEALTH_PID ]] && kill "$HEALTH_PID" 2>/dev/null || true
  mkdir -p "$WORK/logs"
  for c in $("${PODMAN[@]}" ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
    "${PODMAN[@]}" logs "$c" > "$WORK/logs/$c.log" 2>&1 || true
  done
  [[ ${PROOF_KEEP:-0} == 1 ]] || down
}
trap cleanup EXIT
# podman runs healthchecks from systemd timers; without systemd, run them here every 5 s.
(
  while sleep 5; do
    for c in $("${PODMAN[@]}" ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
      "${PODMAN[@]}" healthcheck run "$c" >/dev/null 2>&1 || true
    done
  done
) &
HEALTH_PID=$!
# podman-compose 1.x on podman 4.3 starts services without waiting for `service_healthy` /
# `service_completed_successfully` (it says so and goes on), so podman-compose creates every
# container and they are started in the order those conditions give: infrastructure healthy,
# one-shot jobs done, then the services.
start() {
  local svc
  for svc in "$@"; do
    "${PODMAN[@]}" start "${PROJECT}_${svc}_1" >> "$WORK/up.log" 2>&1 || { tail -20 "$WORK/up.log"; say "FAILED: start $svc"; exit 1; }
  done
}
wait_healthy() {  # wait_healthy <timeout_s> <service>...
  local limit=$((SECONDS + $1)) svc
  shift
  for svc in "$@"; do
    until "${PODMAN[@]}" healthcheck run "${PROJECT}_${svc}_1" >/dev/null 2>&1; do
      ((SECONDS < limit)) || { "${PODMAN[@]}" logs --tail 30 "${PROJECT}_${svc}_1" 2>&1; say "FAILED: $svc not healthy"; exit 1; }
      sleep 2
    done
    say "$svc healthy"
  done
}
wait_done() {  # wait_done <timeout_s> <service>...
  local limit=$((SECONDS + $1)) svc state
  shift
  for svc in "$@"; do
    while state=$("${PODMAN[@]}" inspect -f '{{.State.Status}} {{.State.ExitCode}}' "${PROJECT}_${svc}_1"); [[ $state != exited* ]]; do
      ((SECONDS < limit)) || { "${PODMAN[@]}" logs --tail 30 "${PROJECT}_${svc}_1" 2>&1; say "FAILED: $svc still $state"; exit 1; }
      sleep 5
    done
    [[ $state == "exited 0" ]] || { "${PODMAN[@]}" logs --tail 40 "${PROJECT}_${svc}_1" 2>&1; say "FAILED: $svc $state"; exit 1; }
    say "$svc completed"
  done
}
run_config=$(sed -n 's#^ *source: \(.*\.toml\)$#\1#p' "$COMPOSE_FILE" | head -1)
[[ $run_config == /* ]] || run_config=deploy/compose/$run_config
# never let the engine create a directory where the run file should be
[[ -f $run_config ]] || { say "FAILED: the run config $run_config does not exist"; exit 1; }
if grep -q '^\[launcher.warm_start\]' "$run_config"; then
  sed -i "s/^      <<: \*short$/&\n      OFFBEAT__LAUNCHER__WARM_START__STEPS: \"${PROOF_SFT_STEPS:-30}\"/" "$WORK/proof.override.yml"
fi
say "podman-compose up (profile cpu), run config $run_config"
t0=$SECONDS
: > "$WORK/up.log"
"${DC[@]}" up -d --no-build --no-start --no-deps >> "$WORK/up.log" 2>&1 || { tail -40 "$WORK/up.log"; say "FAILED: podman-compose up"; exit 1; }
start nats postgres
wait_healthy 180 nats postgres
start migrate prepare-model
wait_done 1800 migrate prepare-model
start sandbox scorer inference trainer orchestrator
wait_healthy 600 sandbox scorer inference orchestrator
say "stack up and healthy in $((SECONDS - t0))s"
"${PODMAN[@]}" ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '  {{.Names}} {{.Status}}'

# --- 5. wait for the ledger ----------------------------------------------------------------------
PG="${PROJECT}_postgres_1"
sql() { "${PODMAN[@]}" exec -e PGPASSWORD="$PG_PW" "$PG" psql -h 127.0.0.1 -U offbeat -d offbeat -At -c "$1" 2>/dev/null; }
deadline=$((SECONDS + TIMEOUT_S))
steps=0
while ((SECONDS < deadline)); do
  steps=$(sql "select count(*) from trainer_steps" || echo 0)
  steps=${steps:-0}
  if ((steps >= STEPS)); then break; fi
  for svc in trainer orchestrator inference scorer; do
    state=$("${PODMAN[@]}" inspect -f '{{.State.Status}} {{.State.ExitCode}}' "${PROJECT}_${svc}_1" 2>/dev/null || echo missing)
    if [[ $state == "exited "[1-9]* && $svc != trainer ]]; then say "$svc exited: $state"; fi
  done
  sleep 15
  say "trainer steps in the ledger: $steps / $STEPS"
done
"${PODMAN[@]}" ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '  {{.Names}} {{.Status}}'
if ((steps < STEPS)); then
  for c in prepare-model migrate orchestrator trainer inference scorer sandbox; do
    say "--- last log lines of $c"
    "${PODMAN[@]}" logs --tail 15 "${PROJECT}_${c}_1" 2>&1 || true
  done
  say "FAILED: $steps of $STEPS trainer steps within ${TIMEOUT_S}s"
  exit 1
fi
say "ledger:"
sql "select 'trainer_steps', count(*), max(step) from trainer_steps" | sed 's/^/  /'
sql "select 'trajectories ' || status, count(*) from trajectories group by status order by status" | sed 's/^/  /'
sql "select 'policy_versions', count(*), max(version) from policy_versions" | sed 's/^/  /'
trained=$(sql "select count(*) from trajectories where status = 'trained'")
((trained > 0)) || { say "FAILED: no trajectory is 'trained' in the ledger"; exit 1; }
say "sandbox: print(6*7) through NATS, sent from the orchestrator's container"
sandbox_out=$("${PODMAN[@]}" exec "${PROJECT}_orchestrator_1" sh -c \
  'printf "print(6*7)\n" | offbeat sandbox exec - --nats-url "$OFFBEAT__BUS__NATS_URL"' 2>&1 || true)
printf '%s\n' "$sandbox_out" | grep -E '"(status|stdout|error)"' | sed 's/^/  /'
if ! printf '%s' "$sandbox_out" | grep -q '"stdout": "42'; then
  say "FAILED: the sandbox did not run print(6*7) under compose"
  "${PODMAN[@]}" logs --tail 20 "${PROJECT}_sandbox_1" 2>&1 || true
  exit 1
fi
leaks=0
for c in $("${PODMAN[@]}" ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
  if "${PODMAN[@]}" logs "$c" 2>&1 | grep -q -e "$NATS_PW" -e "$PG_PW" -e "$ADMIN"; then
    say "FAILED: a credential appears in the log of $c"
    leaks=1
  fi
done
((leaks == 0)) || exit 1
say "no credential in any container log"
say "PROOF OK: $steps trainer steps, $trained trained trajectories, in $((SECONDS - t0))s after up"
