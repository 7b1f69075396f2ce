#!/usr/bin/env bash
# Loopback deployment demo: a coordinator and N hospital sites (default 3) on 127.0.0.1, each a separate process
# with its own data, cache and key, talking TLS with SuperNode authentication -- the real deployment, on one machine.
#
#   deploy/loopback_demo.sh [--work DIR] [--data DIR] [--sites N] [--rounds R] [--preset ci|demo] [--patients M] [--port P]
#
# --data: a folder with site-01..site-0N (default: generate a synthetic cohort with `strpnet synth`).
# Outputs: WORK/run (final model, metrics, summary; a rerun in the same WORK, which reuses its certificates, cohort,
# caches and coordinator state, writes WORK/run-<date-time>), logs in WORK/logs. The run needs every site: one that
# stops (e.g. none of its patients could be used) ends the demo with its log's last lines. Every process started
# here is stopped by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/.venv/bin}
WORK=$ROOT/runs/loopback-$(date +%Y%m%d-%H%M%S); DATA=""; NSITES=3; ROUNDS=3; PRESET=ci; PATIENTS=6; PORT=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --work) WORK=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --sites) NSITES=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --preset) PRESET=$2; shift 2 ;;
    --patients) PATIENTS=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "loopback_demo.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$WORK/logs"
PIDS=()
cleanup() { for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill -TERM "$p" 2>/dev/null || true; done
            for p in "${PIDS[@]+"${PIDS[@]}"}"; do wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[[ $NSITES =~ ^[1-9][0-9]?$ ]] || { echo "loopback_demo.sh: --sites $NSITES: give a number of sites from 1 to 99" >&2; exit 2; }
SITES=(); for ((i = 1; i <= NSITES; i++)); do SITES+=("$(printf 'site-%02d' "$i")"); done
# A WORK is made for one number of sites: its keys, cohort and coordinator database hold that many.
if [[ -f $WORK/sites ]] && [[ $(cat "$WORK/sites") != "$NSITES" ]]; then
  echo "loopback_demo.sh: $WORK was made for $(cat "$WORK/sites") sites, not $NSITES: give that --sites or another --work" >&2
  exit 2
fi
echo "$NSITES" > "$WORK/sites"
if [[ -f $WORK/certs/server.pem ]]; then
  echo "== 1. reusing the TLS material and site keys in $WORK/certs"
else
  echo "== 1. TLS + site keys ($WORK/certs)"
  args=(); for s in "${SITES[@]}"; do args+=(--site "$s"); done
  "$ROOT/deploy/make_certs.sh" "$WORK/certs" "${args[@]}"
fi

if [[ -z $DATA ]]; then
  DATA=$WORK/data
  if [[ -f $DATA/truth/cohort.json ]]; then
    echo "== 2. reusing the synthetic cohort in $DATA"
  else
    echo "== 2. synthetic cohort ($PRESET, ~$PATIENTS patients per site) -> $DATA"
    "$BIN/strpnet" synth --out "$DATA" --sites "$NSITES" --patients "$PATIENTS" --preset "$PRESET" --seed 0 --no-png --force
  fi
fi
RUN=$WORK/run; [[ -e $RUN ]] && RUN=$WORK/run-$(date +%Y%m%d-%H%M%S)
[[ -n $PORT ]] || PORT=$("$BIN/python" -c "from strpnet_core.federation import free_port; print(free_port())")

echo "== 3. coordinator on 127.0.0.1:$PORT (log $WORK/logs/server.log)"
keys=(); for s in "${SITES[@]}"; do keys+=(--site-key "$WORK/certs/sites/$s/$s.pub"); done
"$BIN/flower-server" --certs "$WORK/certs" "${keys[@]}" --host 127.0.0.1 --port "$PORT" \
  --state-dir "$WORK/coordinator" --run-dir "$RUN" --rounds "$ROUNDS" -c "preset=$PRESET" \
  --app-dir "$ROOT" > "$WORK/logs/server.log" 2>&1 &
SERVER=$!; PIDS+=("$SERVER")

echo "== 4. ${#SITES[@]} site(s) (each validates + preprocesses its data, then joins)"
SITE_PIDS=()
for s in "${SITES[@]}"; do
  "$BIN/flower-client" --superlink "127.0.0.1:$PORT" --data-dir "$DATA/$s" --cache-dir "$WORK/cache/$s" \
    --site-name "$s" --ca "$WORK/certs/ca.crt" --key "$WORK/certs/sites/$s/$s.key" --preset "$PRESET" \
    > "$WORK/logs/$s.log" 2>&1 &
  PIDS+=("$!"); SITE_PIDS+=("$!")
done

tail -n +1 -f "$WORK/logs/server.log" --pid "$SERVER" | grep --line-buffered -E "\[strpnet\]|registered|finished|ERROR" &
TAILPID=$!
# A site that stops (flower-client retries a lost connection by itself; it exits only when it cannot take part)
# leaves the run without the sites it needs: say which, show why, and stop instead of waiting for the quorum.
while kill -0 "$SERVER" 2>/dev/null; do
  for i in "${!SITE_PIDS[@]}"; do
    if ! kill -0 "${SITE_PIDS[$i]}" 2>/dev/null; then
      code=0; wait "${SITE_PIDS[$i]}" || code=$?
      kill "$TAILPID" 2>/dev/null || true
      echo "== ${SITES[$i]} stopped (exit code $code) before the run ended; the last lines of $WORK/logs/${SITES[$i]}.log:"
      tail -n 8 "$WORK/logs/${SITES[$i]}.log" | sed 's/^/   /'
      echo "== the run needs all ${#SITES[@]} sites: stopping the coordinator; logs in $WORK/logs"
      exit 1
    fi
  done
  sleep 1
done
rc=0; wait "$SERVER" || rc=$?
kill "$TAILPID" 2>/dev/null || true
echo "== coordinator exited with code $rc; outputs in $RUN; logs in $WORK/logs"
exit "$rc"
