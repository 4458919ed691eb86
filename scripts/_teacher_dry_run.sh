# Sourced by train_teacher_gpu.sh / train_teacher_tpu.sh; with DRY_RUN=1 it builds the config's mesh and run
# one training step of a tiny random LLaMA (the tokenizer of BASE, float32, XLA attention) on whatever
# devices JAX sees (CPU devices included), writes predictions as a normal run would, and exits the caller.
# Expects PY, PREPARED, BASE, RUN, CONFIG and the extra arguments ("$@") of the caller.
teacher_dry_run() {
  echo "[dry run] mesh + one step of a tiny random LLaMA under $CONFIG -> $RUN/dry_run"
  $PY -m leader_jax.train.teacher --config "$CONFIG" --config.data_dir="$PREPARED" --config.tokenizer="$BASE" \
      --config.model.source=scratch --config.model.arch.vocab_size=131072 --config.model.param_dtype=float32 \
      --config.model.dtype=float32 --config.model.frozen_dtype=float32 --config.model.remat=none \
      --config.model.attention_impl= --config.lora.domain_path= --config.train.steps=1 \
      --config.train.accum=1 --config.train.eval_every=0 --config.train.ckpt_every=1 --config.train.resume=False \
      --config.data.max_len=256 --config.data.eval_max_len=1024 --config.eval.batch_size=8 \
      --config.distributed.auto=False --out "$RUN/dry_run" "$@"
}

if [ "${DRY_RUN:-0}" = "1" ]; then
  teacher_dry_run "$@"
  exit 0
fi
