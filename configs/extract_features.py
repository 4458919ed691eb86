"""Feature-store extraction: `python -m leader_jax.train.extract_features --config.run_dir=RUN`.

Runs the finished teacher of RUN (its best checkpoint, or the last one) over every split and writes the
pooled hidden state (float16) + drug probabilities per sample id into RUN/features (or --config.out)."""
from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.run_dir = ""                       # a teacher run folder (python -m leader_jax.train.teacher)
    c.out = ""                           # "" = RUN/features
    c.splits = ("train", "val", "test")
    c.checkpoint = "best"                # best (validation PRAUC) | last
    c.batch_size = 64                    # multiple of data*fsdp
    c.shard_size = 512                   # samples per shard file (an interrupted run resumes per shard)
    c.mesh = (1, -1, 1)
    c.stop_after_shards = 0              # >0: stop after writing this many shards (interruption tests)
    c.distributed = ConfigDict(dict(coordinator="", num_processes=0, process_id=0, auto=False))
    return c
