#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine for tests/test_slurm.py (Debian or Ubuntu, as root).
#
#   bash tests/slurm/cluster.sh            # install slurm-wlm + munge if missing, start, wait until idle
#
# Installs with apt-get when sbatch is missing (plus libpmix for `srun --mpi=pmix`), writes
# /etc/slurm/slurm.conf for this host only (state under /tmp/mpicorr-slurm), and starts munged, slurmctld
# and slurmd. Does nothing when a cluster already answers.
set -euo pipefail

if sinfo -h >/dev/null 2>&1 && [ -n "$(sinfo -h -t idle,mix,alloc -o %n)" ]; then
    exit 0
fi
if ! command -v sbatch >/dev/null || ! command -v slurmd >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurm-wlm munge libpmix2 libpmix-dev >/dev/null
fi

STATE=/tmp/mpicorr-slurm
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2))
mkdir -p "$STATE/state" "$STATE/spool" /etc/slurm /run/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=mpicorr-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF

[ -s /etc/munge/munge.key ] || mungekey --create 2>/dev/null || \
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || munged --force
pkill -x slurmctld 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
sleep 1
slurmctld
slurmd
for _ in $(seq 60); do
    if [ -n "$(sinfo -h -t idle -o %n 2>/dev/null)" ]; then
        exit 0
    fi
    sleep 1
done
echo "cluster.sh: SLURM did not come up; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
exit 1
