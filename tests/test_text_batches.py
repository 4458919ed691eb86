"""Prompt truncation rules of `leader_jax.train.text_batches.encode_samples` (the oldest shown history visit
goes first, never the current visit; an overlong training sample is dropped and counted, an overlong
evaluation sample is an error naming it) and the special-token ids (id 0 is a real id)."""
import dataclasses

import numpy as np
import pytest

from leader_jax.train import text_batches as tdata

SPECIAL = tdata.SpecialIds(bos=1, eos=2, pad=0)


class WordTokenizer:
    """One id per whitespace-separated word (ids from 10 up, assigned on first sight)."""

    def __init__(self):
        self.ids = {}

    def encode(self, text, add_special_tokens=False):
        return [self.ids.setdefault(w, 10 + len(self.ids)) for w in text.split()]


@dataclasses.dataclass
class Sample:
    id: str
    history: list          # oldest first: each entry is the words of one visit
    current: str
    single_visit: bool = False


def prompt(s, vocab, max_history, profile):
    """The shown history = the newest `max_history` visits, oldest first, then the current visit."""
    shown = s.history[len(s.history) - max_history:] if max_history else []
    return " ".join([*shown, s.current])


def encode(samples, max_len, overlong, max_history=3):
    tok = WordTokenizer()
    enc = tdata.encode_samples(samples, None, tok, SPECIAL, max_len, max_history=max_history,
                               build_prompt=prompt, split="val" if overlong == "error" else "train",
                               overlong=overlong, labels=np.eye(len(samples), dtype=np.uint8))
    return enc, {v: k for k, v in tok.ids.items()}


def words(enc, row, inv):
    return [inv[i] for i in enc.ids[row, 1:enc.lengths[row] - 1]]


def test_oldest_history_visit_dropped_first():
    s = Sample("a", ["old1 old2", "mid1 mid2", "new1 new2"], "cur1 cur2 cur3")
    enc, inv = encode([s], max_len=2 + 3 + 2, overlong="error")       # room for the current + one visit
    assert words(enc, 0, inv) == ["new1", "new2", "cur1", "cur2", "cur3"]
    assert enc.n_truncated == 1 and enc.n_history_dropped == 2
    assert enc.ids[0, 0] == SPECIAL.bos and enc.ids[0, enc.lengths[0] - 1] == SPECIAL.eos
    assert (enc.ids[0, enc.lengths[0]:] == SPECIAL.pad).all()
    enc, inv = encode([s], max_len=2 + 3 + 4, overlong="error")        # one more visit fits: mid stays
    assert words(enc, 0, inv) == ["mid1", "mid2", "new1", "new2", "cur1", "cur2", "cur3"]
    assert enc.n_truncated == 1 and enc.n_history_dropped == 1
    enc, _ = encode([s], max_len=64, overlong="error")                 # everything fits: nothing counted
    assert enc.n_truncated == 0 and enc.lengths[0] == 2 + 9


def test_overlong_train_sample_dropped_and_counted():
    ok = Sample("ok", ["h1"], "c1 c2")
    long = Sample("too-long", [], "w1 w2 w3 w4 w5 w6")
    enc, _ = encode([ok, long, ok], max_len=6, overlong="drop")
    assert enc.sample_ids == ["ok", "ok"] and enc.dropped_ids == ["too-long"]
    assert len(enc) == 2 and enc.ids.shape == (2, 6)
    np.testing.assert_array_equal(enc.labels, np.eye(3, dtype=np.uint8)[[0, 2]])   # labels follow the rows


def test_overlong_eval_sample_is_an_error_naming_it():
    long = Sample("visit-42", ["h1"], "w1 w2 w3 w4 w5 w6")
    with pytest.raises(ValueError, match=r"val sample 'visit-42'.*needs 8 tokens > max_len=6"):
        encode([Sample("ok", [], "c1"), long], max_len=6, overlong="error")


def test_special_id_zero_is_not_missing():
    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 0, 5, 0

        def token_to_id(self, name):
            return {"<s>": 7, "</s>": 8, "<pad>": 9}.get(name)

    assert tdata.SpecialIds.from_tokenizer(Tok()) == tdata.SpecialIds(bos=0, eos=5, pad=0)
    assert tdata.SpecialIds.from_tokenizer(Tok(), eos=0) == tdata.SpecialIds(bos=0, eos=0, pad=0)

    class Bare:
        def token_to_id(self, name):
            return {"<s>": 7, "</s>": 8}.get(name)

    assert tdata.SpecialIds.from_tokenizer(Bare()) == tdata.SpecialIds(bos=7, eos=8, pad=0)
