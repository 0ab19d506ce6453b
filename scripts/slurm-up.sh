#!/usr/bin/env bash
# Start a real Slurm 22.05 cluster on this host, for the Slurm tests and for trying `sbatch` by hand:
#   slurmctld + slurmdbd (accounting: submitit needs `sacct`, without it a job that dies early makes
#   `job.result()` wait forever) on MariaDB, and N slurmd, each node in its own network namespace with
#   its own hostname and IP on a bridge, so gloo and srun see N distinct machines.
# Idempotent: a healthy cluster is left alone; a broken one is torn down and started again.
# `scripts/slurm-down.sh` stops every daemon it started and restores the network and /etc/hosts.
#
# Knobs (environment): TPRUN_SLURM_NODES (2), TPRUN_SLURM_CPUS per node (4: more than the host has is
# fine), TPRUN_SLURM_GPUS fake GPUs per node (2), TPRUN_SLURM_SUBNET (10.77.0), TPRUN_SLURM_ROOT.
#
# Partitions: `batch` (default) and `urgent`, whose jobs preempt `batch` jobs by requeueing them
# (PreemptMode=REQUEUE, 20 s grace), so preemption can be tested for real.
set -euo pipefail

NODES=${TPRUN_SLURM_NODES:-2}
CPUS=${TPRUN_SLURM_CPUS:-4}
GPUS=${TPRUN_SLURM_GPUS:-2}
SUBNET=${TPRUN_SLURM_SUBNET:-10.77.0}
ROOT=${TPRUN_SLURM_ROOT:-/var/lib/tprun-slurm}
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/slurm-common.sh"

[ "$(id -u)" = 0 ] || { echo "slurm-up: must run as root (it starts daemons and creates namespaces)" >&2; exit 1; }

healthy() {
  local idle
  idle=$(timeout 5 sinfo -h -N -o '%N %T' 2>/dev/null | sort -u | grep -c ' idle$' || true)
  [ "$idle" = "$NODES" ] && timeout 5 sacct -n -X -S now-1minutes >/dev/null 2>&1
}

if [ -f "$ROOT/cluster.env" ] && healthy; then
  echo "slurm-up: cluster already up ($NODES nodes: $(node_names | tr '\n' ' '))"
  exit 0
fi
"$HERE/slurm-down.sh" >/dev/null 2>&1 || true
# A half-started cluster is worse than none: on failure (the logs are printed first), undo it all.
trap 'rc=$?; [ $rc = 0 ] || { echo "slurm-up: failed; undoing" >&2; "$HERE/slurm-down.sh" >/dev/null 2>&1; }' EXIT

# --- packages ---------------------------------------------------------------------------------------
need=()
for cmd in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge slurmdbd:slurmdbd \
           mariadbd:mariadb-server ip:iproute2 nsenter:util-linux; do
  command -v "${cmd%%:*}" >/dev/null 2>&1 || need+=("${cmd##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "slurm-up: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d (when present) keeps the packages' init scripts from starting daemons we start ourselves
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p "$ROOT"/{state,spool,log,run,db,mysql,dev}
cat >"$ROOT/cluster.env" <<EOF
NODES=$NODES
SUBNET=$SUBNET
EOF

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2; shift 2
  for _ in $(seq $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "slurm-up: $what did not come up within $t s; logs in $ROOT/log" >&2
  tail -n 20 "$ROOT"/log/*.log "$ROOT"/mysql/*.log >&2 2>/dev/null || true
  exit 1
}

# --- munge: reuse a working munged, else start one (and remember it is ours) -------------------------
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || { mungekey -c -f -k /etc/munge/munge.key; chown munge: /etc/munge/munge.key; }
  install -d -o munge -g munge -m 0755 /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid
  wait_for 5 munged sh -c 'munge -n | unmunge'
  cp /run/munge/munged.pid "$ROOT/run/munged.pid"
fi

# --- MariaDB in a private data dir on a private port (no clash with a system MariaDB) ----------------
DBPORT=16033
DBPASS=tprun-slurm
chown mysql: "$ROOT/db" "$ROOT/mysql"  # mariadbd runs as mysql: its socket, pid and log live there
mariadb-install-db --user=mysql --datadir="$ROOT/db" --skip-test-db \
  --auth-root-authentication-method=socket >"$ROOT/log/mariadb-install.log" 2>&1
setsid mariadbd --no-defaults --user=mysql --datadir="$ROOT/db" --bind-address=127.0.0.1 \
  --port=$DBPORT --socket="$ROOT/mysql/mysqld.sock" --pid-file="$ROOT/mysql/mariadb.pid" \
  --skip-name-resolve --innodb-buffer-pool-size=32M --log-error="$ROOT/mysql/mariadb.log" \
  </dev/null >/dev/null 2>&1 &
wait_for 20 mariadb mariadb --socket="$ROOT/mysql/mysqld.sock" -e 'select 1'
mariadb --socket="$ROOT/mysql/mysqld.sock" -e "
  CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPASS';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

# --- configuration ----------------------------------------------------------------------------------
HOST=$(hostname -s)
CTL=$SUBNET.1
for i in $(seq "$GPUS"); do
  # Character devices, not plain files: with plain files the node comes up but Slurm never sets
  # CUDA_VISIBLE_DEVICES. 1:3 is /dev/null's device number, so nothing can be harmed through them.
  mknod -m 0666 "$ROOT/dev/fakegpu$((i - 1))" c 1 3
done

install -m 0600 /dev/stdin /etc/slurm/slurmdbd.conf <<EOF
$MARKER
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=$CTL
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
PidFile=$ROOT/run/slurmdbd.pid
LogFile=$ROOT/log/slurmdbd.log
EOF

{
  echo "$MARKER"
  cat <<EOF
ClusterName=tprun
SlurmctldHost=$HOST($CTL)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# No systemd and no cgroup delegation on these machines: track processes by /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
# Lets a node declare more CPUs than the host has.
SlurmdParameters=config_overrides
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTL
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
GresTypes=gpu
# Short waits keep cancel/requeue tests fast (a requeued job waits cred_expire, 120 s by default).
AuthInfo=cred_expire=10
KillWait=10
MinJobAge=300
SchedulerParameters=sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
EOF
  for i in $(seq "$NODES"); do
    echo "NodeName=$(node_name "$i") NodeAddr=$(node_ip "$i") CPUs=$CPUS RealMemory=16000 Gres=gpu:$GPUS State=UNKNOWN"
  done
  echo "PartitionName=batch Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=20"
  echo "PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF"
} >/etc/slurm/slurm.conf

{
  echo "$MARKER"
  echo "Name=gpu File=$ROOT/dev/fakegpu[0-$((GPUS - 1))]"
} >/etc/slurm/gres.conf
[ "$GPUS" -gt 0 ] || sed -i '/^Name=gpu/d' /etc/slurm/gres.conf

# --- network: a bridge, and one namespace per node with its own IP -----------------------------------
ip link add "$BRIDGE" type bridge
ip addr add "$CTL/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
echo "$MARKER: the nodes have no DNS server (see below)" >"$ROOT/resolv.conf"
hosts_lines=""
for i in $(seq "$NODES"); do
  n=$(node_name "$i")
  ip netns add "$(netns_name "$i")"
  ip link add "$(veth_name "$i")" type veth peer name eth0 netns "$(netns_name "$i")"
  ip link set "$(veth_name "$i")" master "$BRIDGE" up
  nsenter --net="/run/netns/$(netns_name "$i")" sh -c "
    ip link set lo up && ip addr add $(node_ip "$i")/24 dev eth0 && ip link set eth0 up &&
    ip route add default via $CTL"
  hosts_lines+="$(node_ip "$i") $n $MARKER"$'\n'
done
# /etc/hosts may be bind-mounted: rewrite it in place rather than replacing the file.
printf '%s' "$hosts_lines" >>/etc/hosts

# --- daemons ------------------------------------------------------------------------------------------
slurmdbd
wait_for 20 slurmdbd bash -c "echo >/dev/tcp/$CTL/6819"
# Registers the cluster before slurmctld's first contact, so its first jobs are recorded too.
sacctmgr -i add cluster tprun >/dev/null 2>&1 || true
slurmctld
wait_for 20 slurmctld scontrol ping
for i in $(seq "$NODES"); do
  n=$(node_name "$i")
  mkdir -p "$ROOT/spool/$n"
  # nsenter, not `ip netns exec`: that one remounts /sys and slurmd then fails to init its cgroup plugin.
  # A mount namespace only to give the node an empty resolv.conf: the host's DNS server is unreachable
  # from the bridge, and every lookup /etc/hosts cannot answer (c10d's reverse lookup of an IPv4-mapped
  # client address) would otherwise wait 10 s for it. Host mounts still propagate in (slave).
  nsenter --net="/run/netns/$(netns_name "$i")" unshare --uts --mount --propagation slave sh -c \
    "mount --bind $ROOT/resolv.conf /etc/resolv.conf && hostname $n && exec slurmd -N $n"
done
wait_for 30 "$NODES idle nodes" healthy
echo "slurm-up: $NODES nodes up: $(sinfo -h -o '%P %D %T %N' | tr '\n' ';') logs in $ROOT/log"
