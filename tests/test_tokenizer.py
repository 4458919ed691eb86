"""BPE tokenizer training: HF-format output readable by AutoTokenizer, LLaMA special-token ids, BOS added,
lossless decode, right padding, determinism, CLI."""
import subprocess
import sys

import pytest

from leader_jax.tokenizer import load_tokenizer, train_bpe_tokenizer

CORPUS = [f"Patient visit {i}: diagnoses dx9:4280 heart failure, atc:C03C loop diuretics, "
          f"procedure px9:3893 venous catheterization number {i % 7}." for i in range(200)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_bpe_tokenizer(CORPUS, 320, tmp_path_factory.mktemp("tok") / "t")


def test_special_tokens_and_round_trip(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 320
    text = "Patient visit 17: dx9:4280 heart failure; unseen ünïcödé 🙂"
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and 2 not in ids and 3 not in ids  # BOS, no EOS, byte-level: no <unk>
    assert tok.decode(ids, skip_special_tokens=True) == text
    # merges were learned: a frequent phrase takes far fewer tokens than characters
    assert len(tok("Patient visit 3: heart failure")["input_ids"]) <= 15  # 30 chars + BOS; 31 without merges
    batch = tok(["dx9:4280", "Patient visit 3: heart failure"], padding=True)
    row = batch["input_ids"][0]
    n = sum(batch["attention_mask"][0])
    assert row[n:] == [0] * (len(row) - n) and n < len(row)  # right padding with pad id 0


def test_deterministic_and_validates(tok_dir, tmp_path):
    again = train_bpe_tokenizer(CORPUS, 320, tmp_path / "t2")
    assert (again / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match="too small"):
        train_bpe_tokenizer(CORPUS, 100, tmp_path / "t3")
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe_tokenizer([], 300, tmp_path / "t4")


def test_cli(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    r = subprocess.run([sys.executable, "scripts/make_tokenizer.py", "--corpus", str(corpus),
                        "--vocab_size", "300", "--out", str(tmp_path / "cli")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "saved 300-token tokenizer" in r.stdout and (tmp_path / "cli" / "tokenizer.json").exists()
    r = subprocess.run([sys.executable, "scripts/make_tokenizer.py", "--corpus", str(tmp_path / "nope.txt"),
                        "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "nope.txt does not exist" in r.stderr
