"""LEADER teacher prompts (the paper's template) with the original code's history-diagnosis defect
fixed: every history line shows its own visit's diagnoses (the original repeated the target visit's).

Template (" \\n " is a real newline with a space on each side; the prompt ends with one space):
    The patient has <VISIT_NUM> times ICU visits. \\n <HISTORY> In this visit, he has diagnosis: <DX>;
    procedures: <PX>. Then, the patient should be prescribed: 
History line (one per shown earlier visit, concatenated without separator):
    In <VISIT_NO> visit, the patient had diagnosis: <DX>; procedures: <PX>. The patient was prescribed
    drugs: <MED>. \\n
VISIT_NUM = number of prior visits (even when more than `max_history` exist); only the last
`max_history` prior visits are shown; VISIT_NO is the 1-based absolute index. Names are joined with
", "; a token without a display name is shown as its bare code (the original dropped it silently).
With `profile=True` a sentence "The patient's profile: field: value, ... \\n " is prepended
(fields in sorted order).
"""
from __future__ import annotations

from typing import Iterable

from leader_jax.data.dataset import Sample, Vocab


def display(tokens: Iterable[str], vocab: Vocab) -> str:
    return ", ".join(vocab.names.get(t) or t.split(":", 1)[-1] for t in tokens)


def history_line(no: int, visit, vocab: Vocab) -> str:
    return (f"In {no} visit, the patient had diagnosis: {display(visit.diagnoses, vocab)}; "
            f"procedures: {display(visit.procedures, vocab)}. "
            f"The patient was prescribed drugs: {display(visit.medications, vocab)}. \n")


def profile_sentence(profile: dict) -> str:
    return "The patient's profile: " + ", ".join(f"{k}: {profile[k]}" for k in sorted(profile)) + ". \n "


def build_prompt(sample: Sample, vocab: Vocab, max_history: int = 3, profile: bool = False) -> str:
    hist = sample.history
    n = len(hist)
    start = max(0, n - max_history) if max_history > 0 else n
    history = "".join(history_line(i + 1, hist[i], vocab) for i in range(start, n))
    t = sample.target
    text = (f"The patient has {n} times ICU visits. \n {history} In this visit, he has diagnosis: "
            f"{display(t.diagnoses, vocab)}; procedures: {display(t.procedures, vocab)}. "
            f"Then, the patient should be prescribed: ")
    if profile:
        text = profile_sentence(sample.profile) + text
    return text
