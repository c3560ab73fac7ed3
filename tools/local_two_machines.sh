#!/usr/bin/env bash
# A launcher (for LAUNCH=...) that plays two machines on this one: both ranks of an accelerate multi-machine config
# (configs/accelerate/multi_node.yaml), one process each, meeting over loopback -- what scripts/rehearse.sh uses to
# back a multi-node launch on a machine without GPUs (each process then trains on the CPU, gloo).
#   LAUNCH="bash tools/local_two_machines.sh configs/accelerate/multi_node.yaml" bash scripts/train_rqvae.sh
set -euo pipefail
CONFIG=$1; shift
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
pids=()
for rank in 0 1; do
  accelerate launch --config_file "$CONFIG" --num_machines 2 --num_processes 2 --machine_rank "$rank" \
    --main_process_ip 127.0.0.1 --main_process_port "$PORT" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
