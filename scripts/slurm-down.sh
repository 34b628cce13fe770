#!/usr/bin/env bash
# Stop the single-node cluster started by slurm-up.sh, by PID file, in reverse order.
set -uo pipefail
if [ -f /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null; then
  squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null || true
  for _ in $(seq 1 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
fi
stop() {  # stop <pidfile>
  local pf="$1" pid
  [ -f "$pf" ] || return 0
  pid="$(cat "$pf")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { echo "pid $pid ($pf) did not stop, sending KILL" >&2; kill -KILL "$pid"; }
  fi
  rm -f "$pf"
}
stop /run/slurmd.pid
stop /run/slurmctld.pid
stop /run/slurmdbd.pid
stop /run/mysqld/mysqld.pid
stop /run/munge/munged.pid
echo "slurm down"
