"""The `retrieval` block: similar past patients in the teacher's prompt (see docs/retrieval.md).

A stage that supports retrieval embeds this block as `c.retrieval = load_config("retrieval.py")` and checks
it with `leader_jax.retrieval.validate_config(cfg.retrieval, prefix="retrieval.")`.

mode none: no retrieval (the plain LEADER teacher); fixed (B0): the k best of a code-similarity candidate
pool are rendered into the prompt; joint (B1): a trainable re-ranker re-scores the pool, trained from the
teacher's loss with each sampled candidate (RankNet pairwise loss, or the REPLUG KL). In the teacher the
re-ranker is part of the trained (and checkpointed) model, with its own optimizer group at `joint.lr`.
"""
from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.mode = "none"                    # none | fixed (B0) | joint (B1)
    c.similarity = "bm25"              # candidate pool: bm25 | jaccard over diagnosis + procedure tokens;
                                       # random (equal-length control) | oracle (drug overlap: uses the
                                       # query's labels, an upper bound only, never a model)
    c.pool = 20                        # candidates per query, precomputed once per split
    c.k = 3                            # neighbours rendered into the prompt
    c.time_order = "within_patient"    # within_patient: visit times are compared inside a patient only
                                       # (admission order); global: a memory visit must be strictly earlier
                                       # than the query visit by Visit.time across patients (needs real,
                                       # comparable times; see docs/retrieval.md)
    c.budget = 0                       # max tokens of the neighbour block; 0 = whatever fits under max_len
    c.bm25 = ConfigDict({"k1": 1.2, "b": 0.75})
    c.seed = 0                         # random pools and candidate sampling

    c.joint = ConfigDict()             # mode=joint only (sampling key: seed above, folded with the step)
    c.joint.m = 8                      # candidates sampled per training example (4-10)
    c.joint.gamma = 1.0                # sampling temperature: softmax(score / gamma)
    c.joint.lam = 0.1                  # total loss = teacher + lam * retriever
    c.joint.loss = "ranknet"           # ranknet (pairwise logistic) | replug (KL to the teacher's posterior)
    c.joint.margin = 0.01              # ranknet: drop pairs whose losses differ by <= margin x their mean
    c.joint.replug_tau = 1.0           # replug: target softmax(-loss / replug_tau), loss = summed drug BCE
    c.joint.lr = 1e-4                  # retriever learning rate (its own optimizer, below the teacher's)
    c.joint.d = 64                     # re-ranker embedding width
    c.joint.hidden = 128               # re-ranker MLP width
    return c
