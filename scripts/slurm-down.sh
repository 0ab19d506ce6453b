#!/usr/bin/env bash
# Stop the cluster scripts/slurm-up.sh started and put the machine back as it was: every daemon and job
# process it started (by pid), the node namespaces, the bridge, its /etc/hosts lines, its config files
# and its state directory. Packages stay installed. Safe to run when nothing is up.
set -uo pipefail
ROOT=${TPRUN_SLURM_ROOT:-/var/lib/tprun-slurm}
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/slurm-common.sh"
SUBNET=${TPRUN_SLURM_SUBNET:-10.77.0}
NODES=${TPRUN_SLURM_NODES:-2}
# shellcheck disable=SC1091
[ -f "$ROOT/cluster.env" ] && . "$ROOT/cluster.env"

[ "$(id -u)" = 0 ] || { echo "slurm-down: must run as root" >&2; exit 1; }

# Jobs first, so their steps end through Slurm rather than being orphaned.
if timeout 5 scontrol ping >/dev/null 2>&1; then
  timeout 10 scancel --quiet --user="$(id -un)" 2>/dev/null || true
fi

# Our pids: the daemons' pid files, plus every process inside a node namespace (slurmd, its
# slurmstepd and their job tasks).
pids=()
for f in "$ROOT"/run/*.pid "$ROOT"/mysql/*.pid; do
  [ -s "$f" ] && pids+=("$(cat "$f")")
done
for i in $(seq "$NODES"); do
  ns=$(netns_name "$i")
  [ -e "/run/netns/$ns" ] && mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null)
done
alive() { local p out=(); for p in "$@"; do kill -0 "$p" 2>/dev/null && out+=("$p"); done; echo "${out[@]:-}"; }
if [ ${#pids[@]} -gt 0 ]; then
  kill "${pids[@]}" 2>/dev/null || true
  # Each daemon takes 1.5-2 s to exit; all were signalled together.
  for _ in $(seq 100); do [ -z "$(alive "${pids[@]}")" ] && break; sleep 0.1; done
  left=$(alive "${pids[@]}")
  # shellcheck disable=SC2086
  [ -n "$left" ] && kill -9 $left 2>/dev/null
fi

for i in $(seq "$NODES"); do
  ip link del "$(veth_name "$i")" 2>/dev/null
  ip netns del "$(netns_name "$i")" 2>/dev/null
done
ip link del "$BRIDGE" 2>/dev/null

if grep -q "$MARKER" /etc/hosts; then
  # In place: /etc/hosts may be a bind mount that a rename would not replace.
  kept=$(grep -v "$MARKER" /etc/hosts)
  printf '%s\n' "$kept" >/etc/hosts
fi
for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf /etc/slurm/slurmdbd.conf; do
  [ -f "$f" ] && head -1 "$f" | grep -q "$MARKER" && rm -f "$f"
done
rm -rf "$ROOT"
echo "slurm-down: stopped"
