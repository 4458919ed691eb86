"""Train a small byte-level BPE tokenizer (HF format) on text files, one document per line.

python scripts/make_tokenizer.py --corpus notes.txt [--corpus more.txt] --vocab_size 2048 --out TOK
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leader_jax.io import progress
from leader_jax.tokenizer import load_tokenizer, train_bpe_tokenizer


def _lines(paths):
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in progress(f, desc=f"read {Path(p).name}", unit="line"):
                line = line.rstrip("\n")
                if line.strip():
                    yield line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", action="append", required=True, help="UTF-8 text file (repeatable)")
    ap.add_argument("--vocab_size", type=int, default=2048)
    ap.add_argument("--min_frequency", type=int, default=2)
    ap.add_argument("--out", required=True, help="output tokenizer directory")
    a = ap.parse_args(argv)
    for p in a.corpus:
        if not Path(p).is_file():
            print(f"error: corpus file {p} does not exist", file=sys.stderr)
            return 2
    try:
        out = train_bpe_tokenizer(_lines(a.corpus), a.vocab_size, a.out, min_frequency=a.min_frequency)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = load_tokenizer(out)
    print(f"saved {len(tok)}-token tokenizer to {out} (pad={tok.pad_token_id} bos={tok.bos_token_id} "
          f"eos={tok.eos_token_id} unk={tok.unk_token_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
