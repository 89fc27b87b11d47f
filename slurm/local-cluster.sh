#!/usr/bin/env bash
# Real Slurm cluster on this one machine (munged + MariaDB + slurmdbd + slurmctld + one slurmd per
# node) for tests.
#
#   slurm/local-cluster.sh up [--nodes N]  install (if missing), configure, start, wait until usable
#   slurm/local-cluster.sh down            cancel its jobs, stop ONLY the daemons this script started
#   slurm/local-cluster.sh status          print state (every node); exit 0 if up, 1 if down
#   slurm/local-cluster.sh purge           down + delete the scratch dir (DB, job state, logs)
#
# --nodes N (default 1): N Slurm nodes in one partition, each a real slurmd of its own on this
# machine. Debian's slurmd is built with --enable-multiple-slurmd (`scontrol show config` prints
# MULTIPLE_SLURMD = Yes), so every node is `slurmd -N HOST-nI` with its own port, spool dir, log and
# pid file, and its own loopback address (NodeAddr=127.0.1.I; all of 127/8 is this machine's lo):
# nothing is sent outside this machine. With 1 node the node is named after the host, as before.
# `up` with another N than the running cluster's reconfigures it (restarts the Slurm daemons).
#
# Needs root; works without systemd (daemons are started directly, in the foreground,
# detached with setsid; their PIDs are tracked in $LESION_VQ_SLURM_DIR/run/*.pid).
#
# Environment:
#   LESION_VQ_SLURM_DIR      scratch dir for config/state/spool/logs/DB  [/tmp/lesion-vq-slurm]
#   LESION_VQ_SLURM_CPUS     CPUs declared for EACH node (may exceed nproc) [max(4, nproc)]
#   LESION_VQ_SLURM_MEM_MB   RealMemory declared for EACH node           [detected by slurmd -C]
#   LESION_VQ_SLURM_CLUSTER  ClusterName                                 [lesionvq]
#
# Clients find the config through /etc/slurm/slurm.conf, which `up` makes a symlink to
# $LESION_VQ_SLURM_DIR/etc/slurm.conf (and `down` removes).  If /etc/slurm/slurm.conf already
# exists and is something else, `up` refuses; export SLURM_CONF instead (see the message).
set -euo pipefail

export PATH="/usr/sbin:/sbin:/usr/bin:/bin:${PATH}"
D="${LESION_VQ_SLURM_DIR:-/tmp/lesion-vq-slurm}"
CLUSTER="${LESION_VQ_SLURM_CLUSTER:-lesionvq}"
ETC_LINK=/etc/slurm/slurm.conf
CONF="$D/etc/slurm.conf"
DBD_CONF="$D/etc/slurmdbd.conf"
MUNGE_SOCK="$D/munge/munge.socket.2"
MYSQL_SOCK="$D/mysql/mysqld.sock"
# Every daemon we start carries this in its environment: it is how `down` recognises its own
# processes (a PID from a pid file is only trusted when the process also has this marker).
MARK="LESION_VQ_SLURM_MARK=$D"
DAEMONS=(munged mariadbd slurmdbd slurmctld)   # + one "slurmd.NODE" per node (see slurmd_keys)
SLURMD_PORT0=6830                              # node I of a multi-node cluster listens on 6830+I
export SLURM_CONF="$CONF"

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
log() { echo "[local-cluster +$(elapsed)s] $*" >&2; }

tail_logs() {  # tail_logs NAME...
  local n
  for n in "$@"; do
    if [[ -s "$D/log/$n.log" ]]; then
      echo "----- last lines of $D/log/$n.log -----" >&2
      tail -n 25 "$D/log/$n.log" >&2
    fi
    # stdout/stderr of the daemon: mostly a copy of its log, but catches early crashes.
    if [[ -s "$D/log/$n.out" ]]; then
      echo "----- last lines of $D/log/$n.out -----" >&2
      tail -n 5 "$D/log/$n.out" >&2
    fi
  done
  echo "(daemons already started are left running; stop them with: $0 down)" >&2
}

die() {  # die MESSAGE [DAEMON-WHOSE-LOGS-TO-SHOW...]
  local msg=$1; shift
  echo "[local-cluster] ERROR: $msg" >&2
  (($#)) && tail_logs "$@"
  exit 1
}

# ---------------------------------------------------------------- process tracking
pid_of() {  # prints the tracked PID of daemon $1 if it is alive and ours; else returns 1
  # $1 is a tracking key: the program name, or "slurmd.NODE" for the slurmd of one node.
  local key=$1 pidf="$D/run/$1.pid" pid
  [[ -r "$pidf" ]] || return 1
  pid=$(<"$pidf")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/environ" ]] || return 1
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "${key%%.*}" ]] || return 1
  tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "$MARK" || return 1
  echo "$pid"
}

is_alive() { pid_of "$1" >/dev/null; }

start_daemon() {  # start_daemon NAME CMD... ; foreground daemon, detached, PID recorded
  local name=$1; shift
  : >"$D/log/$name.out"
  # setsid: own session, so it survives the calling shell and gets no terminal signals.
  # In a non-interactive shell the background child is not a group leader, so setsid
  # exec()s directly and $! is the daemon's own PID.
  env "$MARK" SLURM_CONF="$CONF" MYSQL_UNIX_PORT="$MYSQL_SOCK" \
    setsid "$@" >>"$D/log/$name.out" 2>&1 </dev/null &
  local pid=$! i
  echo "$pid" >"$D/run/$name.pid"
  disown "$pid" 2>/dev/null || true
  # Until env and setsid have exec'ed the daemon, its name is theirs and pid_of would call it dead.
  for ((i = 0; i < 50; i++)); do
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "${name%%.*}" ]] && break
    sleep 0.1
  done
}

wait_for() {  # wait_for SECONDS DAEMON DESCRIPTION CMD... ; poll CMD every 0.2 s
  local limit=$1 name=$2 what=$3; shift 3
  local deadline=$(( $(date +%s) + limit ))
  while ! "$@" >/dev/null 2>&1; do
    is_alive "$name" || die "$name exited while waiting for: $what" "$name"
    (( $(date +%s) < deadline )) || die "timed out after ${limit}s waiting for: $what" "$name"
    sleep 0.2
  done
}

running() {  # alive and not a zombie (PID 1 in a container may be slow to reap orphans)
  local st
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n "$st" && "$st" != Z ]]
}

stop_daemon() {  # TERM, wait up to $2 s, then KILL; only our own tracked process
  local name=$1 limit=${2:-20} pid i
  if ! pid=$(pid_of "$name"); then
    rm -f "$D/run/$name.pid"
    return 0
  fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < limit * 10; i++)); do
    running "$pid" || break
    sleep 0.1
  done
  if running "$pid"; then
    log "$name did not stop in ${limit}s; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$D/run/$name.pid"
}

tracked_slurmds() {  # keys of every slurmd this script started (any node count), from the pid files
  local f
  for f in "$D"/run/slurmd.pid "$D"/run/slurmd.*.pid; do   # not slurmdbd.pid
    [[ -e "$f" ]] && basename "$f" .pid
  done
  return 0
}

our_stray_stepds() {  # slurmstepd processes spawned by our slurmd (they inherit the marker)
  local p
  for p in /proc/[0-9]*; do
    [[ "$(cat "$p/comm" 2>/dev/null)" == slurmstepd ]] || continue
    tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qxF "$MARK" && echo "${p#/proc/}"
  done
  return 0
}

# ---------------------------------------------------------------- install
NEEDED_CMDS=(munged mungekey munge unmunge slurmctld slurmd slurmdbd sbatch sinfo sacct sacctmgr
             scontrol mariadbd mariadb-install-db mariadb-admin)
missing_cmds() {
  local c out=()
  for c in "${NEEDED_CMDS[@]}"; do command -v "$c" >/dev/null 2>&1 || out+=("$c"); done
  [[ -e /usr/lib/x86_64-linux-gnu/slurm-wlm/accounting_storage_mysql.so ]] ||
    compgen -G "/usr/lib/*/slurm-wlm/accounting_storage_mysql.so" >/dev/null || out+=(slurm-mysql-plugin)
  echo "${out[*]}"
}

ensure_packages() {
  local miss; miss=$(missing_cmds)
  [[ -z "$miss" ]] && return 0
  command -v apt-get >/dev/null || die "missing: $miss (and no apt-get to install them)"
  log "installing packages (missing: $miss)"
  # Without systemd, package postinst scripts would try to start the system services
  # (e.g. a system-wide mariadb). Forbid that with a temporary policy-rc.d, unless one exists.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; made_policy=1
  fi
  local pkgs=(munge slurm-wlm slurmctld slurmd slurm-client slurmdbd mariadb-server)
  local rc=0
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"/tmp/lesion-vq-slurm-apt.log" 2>&1 || {
    apt-get update -q >>"/tmp/lesion-vq-slurm-apt.log" 2>&1 &&
      apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"/tmp/lesion-vq-slurm-apt.log" 2>&1
  } || rc=$?
  ((made_policy)) && rm -f "$policy"
  if ((rc)); then
    tail -n 30 /tmp/lesion-vq-slurm-apt.log >&2
    die "apt-get install failed (full log: /tmp/lesion-vq-slurm-apt.log)"
  fi
  miss=$(missing_cmds)
  [[ -z "$miss" ]] || die "still missing after install: $miss"
  log "packages installed"
}

# ---------------------------------------------------------------- config
write_if_changed() {  # write_if_changed FILE MODE < content ; returns 0 if changed
  local f=$1 mode=$2 tmp
  tmp=$(mktemp "$f.XXXXXX")
  cat >"$tmp"
  chmod "$mode" "$tmp"
  if [[ -f "$f" ]] && cmp -s "$tmp" "$f"; then rm -f "$tmp"; return 1; fi
  mv -f "$tmp" "$f"
  return 0
}

node_names() {  # node_names N : the Slurm node names of an N-node cluster on this host
  local host i
  host=$(hostname -s)
  if (($1 == 1)); then echo "$host"; return; fi
  for ((i = 1; i <= $1; i++)); do echo "$host-n$i"; done
}

conf_nodes() {  # node names in the written config (status/all_up need them without --nodes)
  [[ -r "$CONF" ]] && sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$CONF"
  return 0
}

slurmd_keys() {  # tracking keys of the configured nodes' slurmds
  local n
  for n in "${NODES[@]}"; do echo "slurmd.$n"; done
}

gen_config() {  # uses NODE_COUNT; sets NODES and CONF_CHANGED
  local host cpus mem realcpus detected defmem i node_lines=""
  host=$(hostname -s)
  detected=$(slurmd -C 2>/dev/null | head -n1 || true)
  realcpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$detected")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")
  [[ -n "$realcpus" ]] || realcpus=$(nproc)
  [[ -n "$mem" ]] || mem=$(free -m | awk '/^Mem:/{print $2}')
  cpus=${LESION_VQ_SLURM_CPUS:-$(( realcpus > 4 ? realcpus : 4 ))}
  mem=${LESION_VQ_SLURM_MEM_MB:-$mem}
  defmem=$(( mem / cpus / 2 )); (( defmem > 1024 )) && defmem=1024
  mapfile -t NODES < <(node_names "$NODE_COUNT")
  if ((NODE_COUNT == 1)); then
    node_lines="NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
  else
    # Same NodeHostname (this machine), own NodeAddr and Port: slurmctld and srun reach node I at
    # 127.0.1.I, port SLURMD_PORT0+I. Each node declares the CPUs and the memory one node had, so every job
    # that ran on the 1-node cluster still fits on one node (memory is overcommitted, never pending).
    for ((i = 1; i <= NODE_COUNT; i++)); do
      node_lines+="NodeName=${NODES[i-1]} NodeHostname=$host NodeAddr=127.0.1.$i Port=$((SLURMD_PORT0 + i))"
      node_lines+=" CPUs=$cpus RealMemory=$mem State=UNKNOWN"$'\n'
    done
    node_lines=${node_lines%$'\n'}
  fi

  CONF_CHANGED=0
  write_if_changed "$CONF" 644 <<EOF && CONF_CHANGED=1 || true
# Generated by slurm/local-cluster.sh for host '$host' -- do not edit (rewritten by 'up').
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$D/state
# %n = node name: every slurmd of this machine has its own spool dir, pid file and log.
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pidfile
SlurmdPidFile=$D/run/slurmd.%n.pidfile
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No cgroups in a container.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
# Messages to slurmdbd (from slurmctld, sacct, sacctmgr) do NOT use AuthInfo: they take the
# munge socket from AccountingStoragePass (legacy "socket path" form). Without this they try
# /run/munge/munge.socket.2 and fail with "Protocol authentication error".
AccountingStoragePass=$MUNGE_SOCK
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Defaults are sched_interval=60 / bf_interval=30: a requeued job (eligible again after
# cred_expire+1 s) would otherwise sit PENDING up to 30 s until the next backfill pass.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
DependencyParameters=kill_invalid_depend
JobRequeue=1
MinJobAge=30
KillWait=10
ReturnToService=2
InactiveLimit=0
# Accept the declared CPUs/RealMemory even if they exceed the hardware (more CPUs than cores
# lets array tasks / multi-task jobs run side by side on a 2-core machine).
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
$node_lines
# LLN: a job goes to the least loaded node, so array tasks (and jobs side by side) spread over the
# nodes instead of filling the first one.
PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP LLN=YES
EOF

  write_if_changed "$DBD_CONF" 600 <<EOF && CONF_CHANGED=1 || true
# Generated by slurm/local-cluster.sh -- do not edit.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pidfile
StorageType=accounting_storage/mysql
# 'localhost' = MariaDB's unix socket; its path comes from MYSQL_UNIX_PORT in slurmdbd's env.
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chown root:root "$DBD_CONF"
}

link_etc_conf() {
  mkdir -p /etc/slurm
  if [[ -L "$ETC_LINK" && "$(readlink "$ETC_LINK")" == "$CONF" ]]; then return 0; fi
  if [[ -e "$ETC_LINK" || -L "$ETC_LINK" ]]; then
    die "$ETC_LINK exists and is not this cluster's config; not touching it.
  Remove it, or run clients with: export SLURM_CONF=$CONF"
  fi
  ln -s "$CONF" "$ETC_LINK"
}

# ---------------------------------------------------------------- checks
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
check_ports() {  # a port taken by something that is not our daemon -> clear error up front
  local spec name port i specs=(slurmdbd:6819 slurmctld:6817)
  if ((${#NODES[@]} == 1)); then
    specs+=("slurmd.${NODES[0]}:6818")
  else
    for ((i = 1; i <= ${#NODES[@]}; i++)); do specs+=("slurmd.${NODES[i-1]}:$((SLURMD_PORT0 + i))"); done
  fi
  for spec in "${specs[@]}"; do
    name=${spec%%:*}; port=${spec##*:}
    if ! is_alive "$name" && port_busy "$port"; then
      die "port $port (for $name) is already in use by another process (another Slurm?)"
    fi
  done
}
munge_ok() { munge -S "$MUNGE_SOCK" -n 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; }
mysql_ok() { mariadb-admin --no-defaults --socket="$MYSQL_SOCK" ping >/dev/null 2>&1; }
dbd_ok() { timeout 10 sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }
ctld_ok() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state() { timeout 10 sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -n1; }
node_idle() { [[ "$(node_state "$1")" =~ ^(idle|mixed|allocated|completing)$ ]]; }
nodes_idle() {  # every node of NODES usable
  local n
  for n in "${NODES[@]}"; do node_idle "$n" || return 1; done
}
sacct_ok() { timeout 10 sacct -n -X -S now-1minutes >/dev/null 2>&1; }

all_up() {  # every daemon of the NODES configuration alive, no other slurmd of ours, nodes usable
  local n
  for n in "${DAEMONS[@]}" $(slurmd_keys); do is_alive "$n" || return 1; done
  for n in $(tracked_slurmds); do
    [[ " $(slurmd_keys | tr '\n' ' ') " == *" $n "* ]] || ! is_alive "$n" || return 1
  done
  nodes_idle && sacct_ok
}

stop_slurmds() {  # every slurmd we started, whatever node count it was started for
  local key
  for key in $(tracked_slurmds); do stop_daemon "$key" "${1:-20}"; done
}

# ---------------------------------------------------------------- commands
cmd_up() {
  NODE_COUNT=1
  while (($#)); do
    case "$1" in
      --nodes) NODE_COUNT=${2:-}; shift 2 || die "--nodes needs a number" ;;
      --nodes=*) NODE_COUNT=${1#--nodes=}; shift ;;
      *) die "unknown argument for up: $1 (usage: $0 up [--nodes N])" ;;
    esac
  done
  [[ "$NODE_COUNT" =~ ^[1-9][0-9]?$ ]] || die "--nodes must be a number from 1 to 99, not '$NODE_COUNT'"
  [[ $EUID -eq 0 ]] || die "must run as root (starts munged/slurmd/mariadbd)"
  ensure_packages
  mkdir -p "$D"/{etc,munge,mysql,state,spool,log,run}
  chmod 755 "$D" "$D/etc" "$D/munge" "$D/log" "$D/run"   # clients need to reach the munge socket
  gen_config
  if ((CONF_CHANGED == 0)) && all_up; then
    log "already up with ${#NODES[@]} node(s) (nothing to do)"
    return 0
  fi
  if ((CONF_CHANGED)) && { is_alive slurmctld || is_alive slurmdbd || [[ -n "$(tracked_slurmds)" ]]; }; then
    log "config changed while daemons were running (now ${#NODES[@]} node(s)); restarting the Slurm daemons"
    stop_slurmds; stop_daemon slurmctld; stop_daemon slurmdbd
  fi
  # A slurmd of ours for a node that is no longer configured (e.g. 2 nodes -> 1) must not linger.
  local key
  for key in $(tracked_slurmds); do
    [[ " $(slurmd_keys | tr '\n' ' ') " == *" $key "* ]] || stop_daemon "$key"
  done
  link_etc_conf
  check_ports

  # munged (as root: the key is root-owned 0600 in our scratch dir; own socket, so a
  # system munged, if any, is untouched)
  if ! is_alive munged; then
    [[ -s "$D/munge/munge.key" ]] || mungekey --create --keyfile="$D/munge/munge.key" ||
      die "mungekey failed"
    chmod 600 "$D/munge/munge.key"; chown root:root "$D/munge/munge.key"
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    start_daemon munged munged --foreground --socket="$MUNGE_SOCK" \
      --key-file="$D/munge/munge.key" --pid-file="$D/run/munged.pidfile" \
      --seed-file="$D/munge/munged.seed" --log-file="$D/log/munged.log"
  fi
  wait_for 15 munged "munge credential round trip" munge_ok
  log "munged up"

  # MariaDB: private datadir + unix socket only (no TCP), so a system mariadb is untouched.
  if ! is_alive mariadbd; then
    if [[ ! -d "$D/mysql/data/mysql" ]]; then
      log "initialising MariaDB datadir"
      rm -rf "$D/mysql/data"; mkdir -p "$D/mysql/data"
      chown -R mysql:mysql "$D/mysql"
      mariadb-install-db --no-defaults --user=mysql --datadir="$D/mysql/data" \
        --auth-root-authentication-method=socket --skip-test-db >"$D/log/mariadb-install.log" 2>&1 ||
        die "mariadb-install-db failed" mariadb-install
    fi
    chown -R mysql:mysql "$D/mysql"
    rm -f "$MYSQL_SOCK"
    start_daemon mariadbd mariadbd --no-defaults --user=mysql --datadir="$D/mysql/data" \
      --socket="$MYSQL_SOCK" --pid-file="$D/mysql/mariadbd.pid" --skip-networking \
      --log-error="$D/log/mariadbd.log" --innodb-buffer-pool-size=128M \
      --innodb-lock-wait-timeout=900 --innodb-log-file-size=64M
  fi
  wait_for 60 mariadbd "MariaDB ping on $MYSQL_SOCK" mysql_ok
  log "mariadbd up"

  if ! is_alive slurmdbd; then
    start_daemon slurmdbd slurmdbd -D
  fi
  wait_for 60 slurmdbd "slurmdbd answering sacctmgr" dbd_ok
  log "slurmdbd up"
  if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed" slurmdbd
    log "registered cluster '$CLUSTER' in the accounting DB"
  fi

  if ! is_alive slurmctld; then
    mkdir -p "$D/state"
    start_daemon slurmctld slurmctld -D
  fi
  wait_for 60 slurmctld "scontrol ping" ctld_ok
  log "slurmctld up"

  local n
  for n in "${NODES[@]}"; do
    mkdir -p "$D/spool/$n"
    is_alive "slurmd.$n" || start_daemon "slurmd.$n" slurmd -D -N "$n"
  done
  local deadline=$(( $(date +%s) + 60 )) st resumed=""
  for n in "${NODES[@]}"; do
    while ! node_idle "$n"; do
      is_alive "slurmd.$n" || die "slurmd of node $n exited while waiting for it" "slurmd.$n" slurmctld
      st=$(node_state "$n")
      if [[ "$st" =~ ^(down|drain|drained|draining|fail) && " $resumed " != *" $n "* ]]; then
        log "node $n is '$st' (left over from an earlier run?); resuming it"
        scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true
        resumed+=" $n"
      fi
      (( $(date +%s) < deadline )) ||
        die "timed out waiting for node $n to be idle (state: ${st:-?})" "slurmd.$n" slurmctld
      sleep 0.3
    done
    log "slurmd up; node $n is $(node_state "$n")"
  done
  wait_for 30 slurmdbd "sacct answering" sacct_ok
  log "cluster '$CLUSTER' is up (sacct answers). Logs: $D/log"
}

cmd_down() {
  [[ $EUID -eq 0 ]] || die "must run as root"
  local ids p
  if is_alive slurmctld && [[ -f "$CONF" ]]; then
    ids=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
    if [[ -n "${ids// /}" ]]; then
      log "cancelling jobs: $ids"
      # shellcheck disable=SC2086
      scancel $ids 2>/dev/null || true
      for _ in $(seq 75); do   # KillWait=10 s plus margin
        [[ -z "$(timeout 5 squeue -h -o %i 2>/dev/null || true)" ]] && break
        sleep 0.2
      done
    fi
  fi
  stop_slurmds 20
  stop_daemon slurmctld 20
  stop_daemon slurmdbd 20
  stop_daemon mariadbd 60
  stop_daemon munged 10
  for p in $(our_stray_stepds); do
    log "killing stray slurmstepd $p"
    kill -KILL "$p" 2>/dev/null || true
  done
  if [[ -L "$ETC_LINK" && "$(readlink "$ETC_LINK")" == "$CONF" ]]; then rm -f "$ETC_LINK"; fi
  log "down"
}

cmd_status() {
  local n pid up=1
  mapfile -t NODES < <(conf_nodes)
  echo "scratch dir: $D"
  echo "nodes: ${NODES[*]:-none configured}"
  for n in "${DAEMONS[@]}" $(slurmd_keys); do
    if pid=$(pid_of "$n"); then
      printf '  %-16s running (pid %s)\n' "$n" "$pid"
    else
      printf '  %-16s stopped\n' "$n"; up=0
    fi
  done
  ((${#NODES[@]})) || up=0
  if ((up)); then
    if sinfo_out=$(timeout 10 sinfo -N -o '%10N %10n %10o %10P %10T %5c %8m' 2>&1); then echo "$sinfo_out"
    else echo "  sinfo failed: $sinfo_out"; up=0; fi
    for n in "${NODES[@]}"; do
      node_idle "$n" || { echo "  node $n not usable (state: $(node_state "$n"))"; up=0; }
    done
    sacct_ok || { echo "  sacct does not answer"; up=0; }
  fi
  if ((up)); then echo "status: UP"; return 0; fi
  echo "status: DOWN"
  return 1
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  purge) cmd_down; log "removing $D"; rm -rf "$D" ;;
  *) echo "usage: $0 up [--nodes N]|down|status|purge" >&2; exit 2 ;;
esac
