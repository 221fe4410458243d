#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (no systemd, no cgroups), for tests and local sweeps.
#
#   scripts/slurm_cluster.sh up [DIR]      # start munged, slurmctld, slurmd; prints `export SLURM_CONF=...`
#   scripts/slurm_cluster.sh status [DIR]  # daemons and node state
#   scripts/slurm_cluster.sh down [DIR]    # stop the daemons this script started (by recorded PID)
#
# DIR (default: $SLURM_CLUSTER_DIR, else $TMPDIR/slurm-cluster) holds slurm.conf, state, logs and
# PID files. Ports: $SLURM_CLUSTER_PORT (slurmctld) and the next one (slurmd), default 6817/6818.
# Needs root and Debian's slurm-wlm and munge (scripts/install_system_deps.sh installs them).
# Exit status 2: this machine cannot run the cluster (not root, packages missing); the reason is
# printed on stderr, so callers (tests) can skip with it.
set -euo pipefail

action=${1:-}
dir=${2:-${SLURM_CLUSTER_DIR:-${TMPDIR:-/tmp}/slurm-cluster}}
ctld_port=${SLURM_CLUSTER_PORT:-6817}
slurmd_port=$((ctld_port + 1))
conf=$dir/slurm.conf
munge_socket=/run/munge/munge.socket.2

cannot() {
    echo "slurm_cluster: $*" >&2
    exit 2
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Stops one daemon by its recorded PID: SIGTERM, then SIGKILL after 10 s.
stop() {
    local pidfile=$1
    if alive "$pidfile"; then
        local pid
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

write_conf() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    # Leave 1 GiB to the system; jobs get DefMemPerCPU unless they ask (else one job takes the node).
    mem_mb=$(($(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024))
    cat >"$conf" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start once its old credential expired (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem_mb / cpus))
SchedulerType=sched/backfill
# Schedule every 2 s, not every 30-60 s: a requeued job is picked up by the periodic passes.
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
# Seconds from SIGTERM to SIGKILL when a job is cancelled or requeued.
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    # A munged already serving the socket (ours from an earlier `up`, or the system's) is reused.
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    [[ -s /etc/munge/munge.key ]] || cannot "/etc/munge/munge.key is missing (reinstall munge)"
    setsid runuser -u munge -- munged -F --force >>"$dir/munged.out" 2>&1 </dev/null &
    echo $! >"$dir/munged.pid"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    cannot "munged did not start; see $dir/munged.out and /var/log/munge/munged.log"
}

up() {
    [[ $(id -u) == 0 ]] || cannot "needs root (slurmd launches jobs, munged runs as user munge)"
    for cmd in munged slurmctld slurmd sbatch scontrol; do
        command -v "$cmd" >/dev/null || cannot "$cmd not found: run scripts/install_system_deps.sh"
    done
    if alive "$dir/slurmctld.pid" && alive "$dir/slurmd.pid"; then
        echo "export SLURM_CONF=$conf"
        return
    fi
    mkdir -p "$dir/state" "$dir/spool"
    write_conf
    start_munge
    export SLURM_CONF=$conf
    # -i: ignore state of an earlier cluster in this dir (old jobs must not come back).
    setsid slurmctld -D -i -f "$conf" >>"$dir/slurmctld.out" 2>&1 </dev/null &
    echo $! >"$dir/slurmctld.pid"
    setsid slurmd -D -f "$conf" >>"$dir/slurmd.out" 2>&1 </dev/null &
    echo $! >"$dir/slurmd.pid"
    for _ in $(seq 150); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            echo "export SLURM_CONF=$conf"
            return
        fi
        sleep 0.2
    done
    tail -n 5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    down
    cannot "the node did not become idle within 30 s (logs above)"
}

down() {
    # Jobs first, while slurmd can still end their processes.
    if alive "$dir/slurmctld.pid"; then
        SLURM_CONF=$conf scancel --full --quiet --user=root 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -z $(SLURM_CONF=$conf squeue -h 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    stop "$dir/slurmd.pid"
    stop "$dir/slurmctld.pid"
    stop "$dir/munged.pid"
}

status() {
    for daemon in munged slurmctld slurmd; do
        if alive "$dir/$daemon.pid"; then
            echo "$daemon: running (pid $(cat "$dir/$daemon.pid"))"
        else
            echo "$daemon: not started by this script"
        fi
    done
    if alive "$dir/slurmctld.pid"; then
        SLURM_CONF=$conf sinfo
        SLURM_CONF=$conf squeue
    fi
}

case $action in
up) up ;;
down) down ;;
status) status ;;
*)
    echo "usage: $0 up|down|status [DIR]" >&2
    exit 64
    ;;
esac
