"""Exact prompt strings (the LEADER template, history diagnoses per visit): pinned by hand-written
expectations."""
from leader_jax.data.dataset import Sample, Vocab
from leader_jax.data.prompts import build_prompt
from leader_jax.data.records import Visit

VOCAB = Vocab(diag=("dx9:1", "dx9:2", "dx10:1"), proc=("px9:1",), med=("atc:A01A", "atc:B01A"),
              names={"dx9:1": "Hypertension", "dx9:2": "Sepsis", "dx10:1": "Fever", "px9:1": "Intubation",
                     "atc:A01A": "stomatological preparations", "atc:B01A": "antithrombotic agents"})


def V(i, dx, px=("px9:1",), med=("atc:A01A",)):
    return Visit(str(i), f"2100-01-0{i}", tuple(dx), tuple(px), tuple(med))


def test_single_visit_prompt_exact():
    s = Sample("7", "7", (V(1, ["dx9:1", "dx9:2"]),), {"gender": "F"})
    assert build_prompt(s, VOCAB) == (
        "The patient has 0 times ICU visits. \n  In this visit, he has diagnosis: Hypertension, Sepsis; "
        "procedures: Intubation. Then, the patient should be prescribed: ")


def test_history_shows_own_diagnoses_and_truncates_to_last_three():
    visits = (V(1, ["dx9:1"]), V(2, ["dx9:2"], med=("atc:B01A",)), V(3, ["dx10:1"]), V(4, ["dx9:2", "dx9:1"]),
              V(5, ["dx9:1"], px=(), med=("atc:B01A",)))
    s = Sample("9", "9", visits, {})
    expected = (
        "The patient has 4 times ICU visits. \n "
        "In 2 visit, the patient had diagnosis: Sepsis; procedures: Intubation. "
        "The patient was prescribed drugs: antithrombotic agents. \n"
        "In 3 visit, the patient had diagnosis: Fever; procedures: Intubation. "
        "The patient was prescribed drugs: stomatological preparations. \n"
        "In 4 visit, the patient had diagnosis: Sepsis, Hypertension; procedures: Intubation. "
        "The patient was prescribed drugs: stomatological preparations. \n"
        " In this visit, he has diagnosis: Hypertension; procedures: . Then, the patient should be prescribed: ")
    assert build_prompt(s, VOCAB) == expected
    # max_history=1 keeps only the latest prior visit, still numbered absolutely
    one = build_prompt(s, VOCAB, max_history=1)
    assert one.startswith("The patient has 4 times ICU visits. \n In 4 visit, the patient had diagnosis: Sepsis, ")
    assert "In 3 visit" not in one


def test_profile_sentence_and_unnamed_code_fallback():
    s = Sample("3", "3", (V(1, ["dx9:1", "dx9:999"]),), {"insurance": "Medicare", "age": "60-69"})
    assert build_prompt(s, VOCAB, profile=True) == (
        "The patient's profile: age: 60-69, insurance: Medicare. \n "
        "The patient has 0 times ICU visits. \n  In this visit, he has diagnosis: Hypertension, 999; "
        "procedures: Intubation. Then, the patient should be prescribed: ")


def test_prompt_on_prepared_data_uses_target_last(prepared_synthetic):
    from leader_jax.data.dataset import PreparedData

    d = PreparedData.load(prepared_synthetic)
    s = next(x for x in d.splits["train"] if len(x.visits) >= 2)
    p = build_prompt(s, d.vocab)
    assert p.startswith(f"The patient has {len(s.visits) - 1} times ICU visits. \n In ")
    tail = p.split(" In this visit, he has diagnosis: ")[1]
    assert tail.startswith(d.vocab.names[s.target.diagnoses[0]])
