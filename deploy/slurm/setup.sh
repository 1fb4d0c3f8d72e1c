#!/usr/bin/env bash
# A single-node Slurm cluster on this host, for developing and testing `--backend slurm`:
# installs Debian's slurm-wlm and munge, writes a one-node configuration (with stand-in
# GPU devices, so that GPU requests schedule on a machine without GPUs),
# and starts munged, slurmctld and slurmd. Idempotent: run it again to restart what stopped.
#
#   sudo deploy/slurm/setup.sh          # install, configure, start
#   sudo deploy/slurm/setup.sh stop     # stop the daemons it started
#
# Slurm accounting (slurmdbd) is not set up: gpuq reads states with squeue/scontrol.
set -euo pipefail

NODE="$(hostname -s)"
CONF_DIR=/etc/slurm
GPUS="${GPUQ_SLURM_DEV_GPUS:-4}"
MAX_ARRAY="${GPUQ_SLURM_DEV_MAX_ARRAY:-1001}"

if [ "$(id -u)" -ne 0 ]; then
  echo "deploy/slurm/setup.sh installs packages and starts daemons: run it as root" >&2
  exit 1
fi

stop() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
  pkill -x munged || true
  for _ in $(seq 1 20); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -x munged >/dev/null \
      || return 0
    sleep 0.5
  done
}

if [ "${1:-}" = "stop" ]; then
  stop
  exit 0
fi

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge authenticates every Slurm message; its key comes with the package.
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --force
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge /var/log/munge /var/lib/munge
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1
fi

CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
install -d -m 0755 /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > "$CONF_DIR/slurm.conf" <<EOF
ClusterName=gpuq-dev
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MaxArraySize=$MAX_ARRAY
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=300
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
# Stand-ins for GPUs: Slurm counts gres from device files, so the fake GPUs are character
# devices that behave as /dev/null. Jobs get GPUs allocated and CUDA_VISIBLE_DEVICES set.
FAKE_DIR=/dev/gpuq-fake
install -d -m 0755 "$FAKE_DIR"
for i in $(seq 0 $((GPUS - 1))); do
  [ -e "$FAKE_DIR/gpu$i" ] || mknod -m 666 "$FAKE_DIR/gpu$i" c 1 3
done
echo "NodeName=$NODE Name=gpu File=$FAKE_DIR/gpu[0-$((GPUS - 1))]" > "$CONF_DIR/gres.conf"
cat > "$CONF_DIR/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
EOF

if pgrep -x slurmctld >/dev/null; then
  scontrol reconfigure  # a running controller takes the configuration written above
else
  setsid slurmctld </dev/null >/dev/null 2>&1
fi
if ! pgrep -x slurmd >/dev/null; then
  setsid slurmd </dev/null >/dev/null 2>&1
fi

# Wait for the node to come up; a node that was down before comes back here.
for _ in $(seq 1 60); do
  state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)"
  case "$state" in
    idle*|mixed*|allocated*) echo "slurm: node $NODE is $state"; exit 0 ;;
    down*|drain*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
echo "slurm did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
sinfo >&2 || true
exit 1
