#!/usr/bin/env bash
# A throw-away two-node SLURM cluster on this machine (root, Debian/Ubuntu slurm-wlm + munge), for tests
# and for trying the SLURM examples by hand.
#
#   tests/launch/slurm_ci.sh up          munged (unless one runs) + slurmctld + slurmd node1, node2
#   tests/launch/slurm_ci.sh run CMD...  a client command against it (sbatch, srun, sinfo, scancel)
#   tests/launch/slurm_ci.sh down        stop every daemon this script started (by PID), restore /etc/hosts
#
# node1 and node2 are two slurmd processes on 127.0.0.1 with distinct ports (multiple-slurmd mode);
# their names are added to /etc/hosts, tagged, and removed again by `down`. Everything else lives in
# $SLURM_CI_DIR (default /tmp/megatron_lite-slurm-ci). Ports: SLURM_CI_PORTS="CTLD NODE1 NODE2"
# (default "16817 16818 16819"). Several clusters can run at once (e.g. two test sessions): give each
# its own SLURM_CI_DIR and ports; each has its own munged (socket under /run/munge, named after the
# directory), its own /etc/hosts tag, and `down` touches only its own daemons and lines.
# Needs: apt-get install -y slurm-wlm munge.
set -euo pipefail

BASE=${SLURM_CI_DIR:-${TMPDIR:-/tmp}/megatron_lite-slurm-ci}
read -r CTLD_PORT NODE1_PORT NODE2_PORT <<<"${SLURM_CI_PORTS:-16817 16818 16819}"
CONF=$BASE/slurm.conf
ID=$(printf %s "$BASE" | md5sum | cut -c1-10)
MUNGE=/run/munge/megatron_lite-$ID # .socket .pid .seed .log
HOSTS_TAG="# megatron_lite-slurm-ci $ID"

die() {
  echo "slurm_ci: $*" >&2
  exit 1
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged --socket="$MUNGE.socket" --pid-file="$MUNGE.pid" \
    --seed-file="$MUNGE.seed" --log-file="$MUNGE.log"
  cp "$MUNGE.pid" "$BASE/munged.pid"
  munge -S "$MUNGE.socket" -n | unmunge -S "$MUNGE.socket" >/dev/null || die "munge does not work"
}

write_conf() {
  local host
  host=$(hostname -s)
  cat >"$CONF" <<EOF
ClusterName=megatronlite
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmctldPort=$CTLD_PORT
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd-%n.pid
SlurmctldLogFile=$BASE/slurmctld.log
SlurmdLogFile=$BASE/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=10
# 'sbatch --wait' polls every 2 s only while finished jobs stay visible briefly (else 2 -> 8 -> 32 s)
MinJobAge=2
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$NODE1_PORT CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$NODE2_PORT CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
}

client() {
  SLURM_CONF=$CONF "$@"
}

up() {
  command -v slurmctld >/dev/null || die "slurmctld not found (apt-get install -y slurm-wlm munge)"
  [ "$(id -u)" = 0 ] || die "must run as root"
  [ -e "$BASE/up" ] && die "already up in $BASE (run '$0 down' first)"
  mkdir -p "$BASE/state" "$BASE/spool"
  touch "$BASE/up"
  start_munge
  grep -qxF "127.0.0.1 node1 node2 $HOSTS_TAG" /etc/hosts ||
    echo "127.0.0.1 node1 node2 $HOSTS_TAG" >>/etc/hosts
  write_conf
  slurmctld -f "$CONF" -c
  slurmd -f "$CONF" -N node1
  slurmd -f "$CONF" -N node2
  for _ in $(seq 1 150); do
    client sinfo -h -o '%T %D' 2>/dev/null | grep -qx "idle 2" && {
      client sinfo
      return 0
    }
    sleep 0.2
  done
  client sinfo || true
  tail -n 20 "$BASE"/*.log >&2 || true
  die "nodes did not become idle; see $BASE/*.log"
}

stop_pid() { # SIGTERM, then wait up to 5 s (SIGKILL after that)
  local pid=$1
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 50); do
    [ -e "/proc/$pid" ] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
}

down() {
  local f jobs
  if [ -s "$BASE/slurmctld.pid" ] && kill -0 "$(cat "$BASE/slurmctld.pid")" 2>/dev/null; then
    # cancel this cluster's jobs and let their steps end before the daemons go (else slurmstepd lingers)
    jobs=$(client squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      client scancel $jobs 2>/dev/null || true
      for _ in $(seq 1 100); do
        [ -z "$(client squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.2
      done
    fi
  fi
  if [ -d "$BASE" ]; then
    for f in "$BASE"/slurmd-*.pid "$BASE/slurmctld.pid" "$BASE/munged.pid"; do
      [ -s "$f" ] && stop_pid "$(cat "$f")"
    done
  fi
  rm -f "$MUNGE".*
  if grep -qF " $HOSTS_TAG" /etc/hosts; then
    grep -vF " $HOSTS_TAG" /etc/hosts >"/tmp/.megatron_lite-hosts.$$" || true
    cat "/tmp/.megatron_lite-hosts.$$" >/etc/hosts # in place: /etc/hosts may be a bind mount
    rm -f "/tmp/.megatron_lite-hosts.$$"
  fi
  rm -rf "$BASE"
}

case "${1:-}" in
up) up ;;
down) down ;;
run)
  shift
  client "$@"
  ;;
*) die "usage: $0 up | run CMD... | down" ;;
esac
