# Names shared by slurm-up.sh and slurm-down.sh (sourced, not run).
# Everything this cluster writes outside $ROOT carries $MARKER, so slurm-down.sh removes exactly that.
MARKER="# tprun-slurm"
BRIDGE=tpslurm0
node_name() { printf 'slurm-node%02d' "$1"; }
node_ip() { echo "$SUBNET.$((10 + $1))"; }
netns_name() { printf 'tprun-%s' "$(node_name "$1")"; }
veth_name() { printf 'tpsl-n%02d' "$1"; }
node_names() { for i in $(seq "$NODES"); do node_name "$i"; echo; done; }
