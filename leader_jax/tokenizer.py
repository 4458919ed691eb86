"""Small byte-level BPE tokenizers in Hugging Face format (for the tiny models in tests and the demo).

`train_bpe_tokenizer(texts, vocab_size, out_dir)` trains with the `tokenizers` library and saves a
`PreTrainedTokenizerFast` directory that `transformers.AutoTokenizer.from_pretrained(out_dir)` reads.
Special tokens follow the LLaMA ids: <pad>=0, <s>=1 (BOS), </s>=2 (EOS), <unk>=3. Encoding prepends BOS
(LLaMA convention) and never appends EOS: the teacher appends EOS itself and pools there. Byte-level
pre-tokenisation means no input is ever out of vocabulary; padding is on the right.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from leader_jax.io import atomic_dir

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir, min_frequency: int = 2,
                        model_max_length: int = 1_000_000) -> Path:
    """Train a byte-level BPE on `texts` and save it (HF format) to `out_dir` atomically; returns the path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    n_alphabet = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_alphabet + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                         f"{n_alphabet + len(SPECIAL_TOKENS)} (256 bytes + 4 special tokens)")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    n = [0]

    def counted():
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"train_bpe_tokenizer: texts must be str, got {type(t).__name__}")
            n[0] += 1
            yield t

    tok.train_from_iterator(counted(), trainer=trainer)
    if n[0] == 0:
        raise ValueError("train_bpe_tokenizer: empty corpus")
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, padding_side="right", model_max_length=model_max_length)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        fast.save_pretrained(tmp)
    return out_dir


def load_tokenizer(path):
    """AutoTokenizer from an HF model/tokenizer directory (local files only, no remote code)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: tokenizer directory does not exist")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
