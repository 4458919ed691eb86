"""Stage 1, domain adaptation: `python -m leader_jax.train.pretrain --config configs/pretrain_tiny.py --out PRE`.

Causal-LM training on clinical text = the training split's teacher prompts (never val/test: their drugs
are labels) + ICD/ATC titles from the bundled dictionaries. Two modes:
- `mode=full`: every weight is trained (a tiny LLaMA from scratch, with a byte-level BPE tokenizer
  trained here on the same corpus). Writes `PRE/base/` (HF folder: config, safetensors, tokenizer).
- `mode=adapter`: a frozen pretrained base (`model.path`: an HF folder, a `.gguf` file or `smollm2`) + a
  `DomainLoRA` adapter (Clinical LLaMA-LoRA step 1).
  Writes `PRE/domain_adapter/` (HF PEFT format) for stage 2's `lora.domain_path`.
Both report held-out perplexity before and after (a 5 % held-out slice of the corpus; the "before" value
is kept in the checkpoints, so a resumed run still reports it). What this measures is vocabulary/ontology
adaptation on open text, not clinical-note adaptation. With `domain.first_layer=K` the adapter sits on
layers K.. only, and `model.cache_prefix` runs the frozen layers below K once per document
(`models.frozen_prefix`). Documents are padded to length buckets
(`data.length_buckets`); summary.json reports the compile count and the padding fraction. A GGUF base's
tokenizer is saved as `PRE/tokenizer/` (an HF tokenizer folder).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from leader_jax.cli import UserError
from leader_jax.models import frozen_prefix as fp, lora
from leader_jax.models.teacher import causal_lm_loss
from leader_jax.train import common, loop, text_batches as tdata, distributed
from leader_jax.train.engine import Checkpointer, Engine
from leader_jax.train.length_buckets import BucketedStream, PadStats, bucket_set, validate_buckets

MODES = ("full", "adapter")

# ----------------------------------------------------------------------------------------- corpus
def read_titles(spec: str) -> list[str]:
    """`path:column` -> the non-empty strings of that column (csv/csv.gz, every column read as str)."""
    import pandas as pd

    path, _, column = spec.rpartition(":")
    if not path:
        raise UserError(f"corpus title source {spec!r} must be PATH:COLUMN")
    if not Path(path).exists():
        raise UserError(f"corpus title file not found: {path}")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    cols = {c.lower(): c for c in df.columns}
    if column.lower() not in cols:
        raise UserError(f"{path}: no column {column!r} (has {list(df.columns)})")
    return [t.strip() for t in df[cols[column.lower()]].tolist() if t and t.strip() and t != "NA"]


def pack(lines: list[str], max_chars: int) -> list[str]:
    """Join short lines into documents of about `max_chars` characters (newline separated)."""
    docs, cur, n = [], [], 0
    for line in lines:
        if cur and n + len(line) + 1 > max_chars:
            docs.append("\n".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += len(line) + 1
    if cur:
        docs.append("\n".join(cur))
    return docs


def build_corpus(cfg: ConfigDict, prepared) -> tuple[list[str], dict[str, int]]:
    """Training-split prompts + packed titles (dataset vocabulary names + dictionary files), shuffled."""
    from leader_jax.data.prompts import build_prompt

    from leader_jax.data.prompts import display

    prompts = [build_prompt(s, prepared.vocab, max_history=cfg.data.max_history, profile=cfg.data.profile)
               for s in prepared.splits["train"]]
    if cfg.corpus.with_targets:      # train split only: its drugs are training labels anyway
        # "BOS prompt EOS drugs EOS": the EOS state, which the teacher pools, learns to predict the drugs
        prompts = [p + tdata.SEGMENT_SEP + display(s.target.medications, prepared.vocab)
                   for p, s in zip(prompts, prepared.splits["train"])]
    titles = sorted(set(prepared.vocab.names.values()))
    for spec in cfg.corpus.title_sources:
        titles.extend(read_titles(spec))
    titles = list(dict.fromkeys(titles))                      # unique, first-appearance order
    rng = np.random.default_rng(cfg.seed)
    if cfg.corpus.max_titles and len(titles) > cfg.corpus.max_titles:
        titles = [titles[i] for i in sorted(rng.choice(len(titles), cfg.corpus.max_titles, replace=False))]
    rng.shuffle(titles)
    docs = prompts + pack(titles, cfg.corpus.pack_chars)
    order = rng.permutation(len(docs))
    return [docs[i] for i in order], {"n_prompts": len(prompts), "n_titles": len(titles),
                                      "n_docs": len(docs)}


def split_heldout(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(held-out documents, training documents): the first max(1, fraction·n) of the shuffled corpus."""
    n_held = max(1, int(len(docs) * fraction))
    return docs[:n_held], docs[n_held:]


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """The byte-level BPE of `leader_jax.tokenizer` (pad 0, bos 1, eos 2, unk 3) trained on `texts`.
    Process 0 writes it to `out_dir`; other processes train the same (deterministic) one privately."""
    import tempfile

    from leader_jax.tokenizer import load_tokenizer, train_bpe_tokenizer

    if distributed.is_main_process():
        return load_tokenizer(train_bpe_tokenizer(texts, vocab_size, out_dir))
    with tempfile.TemporaryDirectory() as tmp:
        return load_tokenizer(train_bpe_tokenizer(texts, vocab_size, Path(tmp) / "tok"))


# ----------------------------------------------------------------------------------------- training
def lm_loss(model, mb):
    loss, _ = causal_lm_loss(model(mb["input_ids"], mb["attention_mask"]), mb["input_ids"], mb["attention_mask"])
    return loss, {}


def lm_nll(model, b):
    """Per-row (sum of next-token NLL, number of target tokens) for held-out perplexity."""
    import optax
    ids, mask = b["input_ids"], b["attention_mask"]
    logits = model(ids, mask)
    nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:])
    w = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * w, axis=1), jnp.sum(w, axis=1)


def heldout_ppl(engine: Engine, enc: tdata.Encoded, batch_size: int, **kw) -> float:
    """exp(total NLL / total target tokens) over the held-out documents (`kw`: buckets, stats)."""
    nll, n = loop.gather(engine, enc, batch_size, desc="held-out ppl", **kw)
    return float(math.exp(float(nll.astype(np.float64).sum()) / max(float(n.astype(np.float64).sum()), 1.0)))


def validate_config(cfg: ConfigDict) -> None:
    """UserError on a bad stage-1 config value (the mesh-dependent batch checks come later)."""
    if cfg.mode not in MODES:
        raise UserError(f"mode={cfg.mode!r}; expected {' | '.join(MODES)}")
    if cfg.model.source not in ("hf", "scratch"):
        raise UserError(f"model.source={cfg.model.source!r}; expected hf | scratch")
    if cfg.mode == "adapter" and cfg.model.source != "hf":
        raise UserError("mode=adapter trains a domain adapter on a pretrained base: set model.source=hf")
    common.check_dot_dtype(cfg.model)
    if not 0 < float(cfg.corpus.heldout_fraction) < 1:
        raise UserError(f"corpus.heldout_fraction={cfg.corpus.heldout_fraction} must be in (0, 1)")
    for k in ("max_titles", "pack_chars"):
        if int(cfg.corpus[k]) < 0:
            raise UserError(f"corpus.{k} must be >= 0, got {cfg.corpus[k]}")
    for k in ("max_len", "max_history"):
        if int(cfg.data[k]) <= (1 if k == "max_len" else -1):
            raise UserError(f"data.{k}={cfg.data[k]} is out of range")
    if int(cfg.domain.first_layer) < 0:
        raise UserError(f"domain.first_layer={cfg.domain.first_layer} must be >= 0 (0 = every layer)")
    if cfg.model.cache_prefix and (cfg.mode != "adapter" or int(cfg.domain.first_layer) <= 0):
        raise UserError("model.cache_prefix=True needs mode=adapter and domain.first_layer > 0 (the frozen "
                        "layers below it are cached)")
    if int(cfg.domain.rank) <= 0 or not 0 <= float(cfg.domain.dropout) < 1:
        raise UserError(f"domain.rank={cfg.domain.rank} must be > 0 and domain.dropout={cfg.domain.dropout} "
                        f"in [0, 1)")
    if int(cfg.eval.batch_size) <= 0:
        raise UserError(f"eval.batch_size must be positive, got {cfg.eval.batch_size}")
    try:
        validate_buckets("data.length_buckets", cfg.data.length_buckets)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.tokenizer.train and int(cfg.tokenizer.vocab_size) <= 4:
        raise UserError(f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} is too small")
    loop.validate_train(cfg.train)


def train(cfg: ConfigDict) -> dict[str, Any]:
    from leader_jax.models.llama import save_hf

    validate_config(cfg)
    if not cfg.data_dir:
        raise UserError("set --config.data_dir=PREPARED")
    if not cfg.out:
        raise UserError("set --out PRE (the stage-1 run folder)")
    run, prepared = common.start_run(cfg)
    docs, corpus_info = build_corpus(cfg, prepared)
    held_docs, train_docs = split_heldout(docs, cfg.corpus.heldout_fraction)

    # tokenizer: trained here (full mode from scratch) or the base model's
    if cfg.tokenizer.train:
        tok_dir = run / "tokenizer"
        tok = train_tokenizer([d.replace(tdata.SEGMENT_SEP, " ") for d in train_docs], cfg.tokenizer.vocab_size,
                              tok_dir)
    else:
        tok = common.load_run_tokenizer(cfg.tokenizer.path or cfg.model.path, run)
    special = tdata.SpecialIds.from_tokenizer(tok)
    mcfg = cfg.model
    if mcfg.source == "scratch":
        with mcfg.unlocked():
            mcfg.arch.vocab_size = max(int(mcfg.arch.vocab_size), len(tok))
            mcfg.arch.bos_token_id, mcfg.arch.eos_token_id, mcfg.arch.pad_token_id = \
                special.bos, special.eos, special.pad
    mesh = common.make_mesh(cfg)
    common.check_batch_sizes(mesh, {"train.micro_batch": cfg.train.micro_batch,
                                    "eval.batch_size": cfg.eval.batch_size})
    conf, model = common.load_base(mcfg, mesh, cfg.seed)
    k = int(cfg.domain.first_layer) if cfg.model.cache_prefix else 0
    if cfg.mode == "adapter":
        d = cfg.domain
        n_layers = conf.num_hidden_layers
        if int(d.first_layer) >= n_layers:
            raise UserError(f"domain.first_layer={d.first_layer} must be < the model's {n_layers} layers")
        lora.add_adapter(model, "domain", d.targets, rank=d.rank, alpha=d.alpha, dropout=d.dropout,
                         param_type=lora.DomainLoRA, seed=cfg.seed + 1,
                         layers=range(int(d.first_layer), n_layers) if int(d.first_layer) else None)
        trainable = lora.DomainLoRA
    else:
        trainable = nnx.Param
    train_enc = tdata.encode_texts(train_docs, tok, special, cfg.data.max_len)
    held_enc = tdata.encode_texts(held_docs, tok, special, cfg.data.max_len)

    tr = cfg.train
    tx, schedule = loop.make_tx(tr)
    engine = Engine(model, trainable, tx, mesh, fp.UpperLMLoss(k) if k else lm_loss, frozen_dtype=mcfg.frozen_dtype,
                    predict_fn=fp.UpperLMNll(k) if k else lm_nll)
    ckpt = Checkpointer(run / "checkpoints", max_to_keep=2)
    identity = common.run_identity(cfg, prepared.fingerprint())
    meta = loop.resume(engine, ckpt, tr, identity, run)
    buckets = tuple(int(b) for b in cfg.data.length_buckets) or None
    stats = {"train": PadStats(), "eval": PadStats()}
    stream = BucketedStream(train_enc.lengths, bucket_set(buckets, cfg.data.max_len), tr.accum * tr.micro_batch,
                            cfg.seed) if buckets else None
    if k:                                   # the frozen layers below k, once per document
        stats["prefix"] = PadStats()
    caches = {name: fp.PrefixCache(engine, enc, k, cfg.eval.batch_size, buckets=buckets, stats=stats["prefix"],
                                   desc=f"frozen prefix {name}")
              for name, enc in (("train", train_enc), ("heldout", held_enc))} if k else {}
    ppl = lambda: heldout_ppl(engine, held_enc, cfg.eval.batch_size, buckets=buckets,  # noqa: E731
                              stats=stats["eval"], prefix=caches.get("heldout"))
    if meta is not None and meta.get("heldout_ppl_before") is not None:
        ppl_before = float(meta["heldout_ppl_before"])
    else:                                       # a fresh run (or a checkpoint without the value)
        ppl_before = ppl() if engine.step == 0 else None
    log = common.open_log(run, engine.step)
    res = loop.fit(engine, ckpt, tr, log=log, desc="pretrain", schedule=schedule,
                   next_batch=lambda step: tdata.train_batch(train_enc, step, tr.accum, tr.micro_batch,
                                                             cfg.seed, mesh, stream=stream, stats=stats["train"],
                                                             prefix=caches.get("train")),
                   meta=lambda: {**identity, "heldout_ppl_before": ppl_before})
    summary = {**corpus_info, "n_train_docs": len(train_docs), "n_heldout_docs": len(held_docs),
               "train_truncated": train_enc.n_truncated, "mode": cfg.mode, "steps_done": res.steps_done,
               "n_trainable": engine.n_trainable(), "n_frozen": engine.n_frozen(),
               "heldout_ppl_before": ppl_before, "train_seconds_this_run": res.seconds,
               "length_buckets": list(bucket_set(buckets or (), cfg.data.max_len)),
               **common.mesh_info(mesh)}
    costs = lambda: {"compiles": engine.compiles(),  # noqa: E731
                     "padding": {n: v.summary() for n, v in stats.items() if v.computed_tokens},
                     **({"prefix_cache": {"layers": k, **{n: c.info() for n, c in caches.items()}}}
                        if caches else {})}
    if not res.finished:
        return loop.write_unfinished(run, {**summary, **costs()})
    summary["heldout_ppl_after"] = ppl()
    summary.update(costs())
    trained = nnx.merge(engine.graphdef_eval, distributed.host_copy(engine.trainable), engine.rng_keys,
                        distributed.host_copy(engine.frozen))
    if cfg.mode == "full":
        base_dir = run / "base"
        if distributed.is_main_process():
            save_hf(trained, conf, base_dir, dtype="float32")
            if hasattr(tok, "save_pretrained"):
                tok.save_pretrained(str(base_dir))
        summary["base"] = str(base_dir.absolute())
    else:
        ad = run / "domain_adapter"
        if distributed.is_main_process():
            lora.save_adapter(trained, "domain", ad, base_model_name_or_path=str(mcfg.path))
        summary["domain_adapter"] = str(ad.absolute())
    common.write_json(run / "summary.json", {**summary, "finished": True})
    return summary


def main(cfg: ConfigDict, argv: list[str]) -> None:
    s = train(cfg)
    if distributed.is_main_process():
        print(json.dumps({k: s[k] for k in ("steps_done", "heldout_ppl_before", "heldout_ppl_after") if k in s}))


if __name__ == "__main__":
    from leader_jax import cli
    cli.run(main, "pretrain_tiny.py")
