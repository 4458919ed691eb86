"""RawCohort → PreparedData: top-k code filters, samples per protocol, patient-level splits,
train-built profile vocabularies, DDI matrix over the label space, statistics and report.

Top-k counts are visit occurrences over the whole cohort (as the original counted over all data);
ties are broken by token so the vocabulary order is deterministic: frequency descending, then token.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Sequence, Tuple

import numpy as np

from leader_jax.data import mappings
from leader_jax.data.cohort import UNKNOWN, RawCohort, id_key
from leader_jax.data.dataset import SPLITS, PreparedData, Sample, Vocab
from leader_jax.data.records import Patient, Visit
from leader_jax.data.report import render_report
from leader_jax.io import progress

CHAN = (("diagnoses", "diag", "top_k_diag"), ("procedures", "proc", "top_k_proc"),
        ("medications", "med", "top_k_med"))


DEFAULT_TOP_K_MED = {"eicu": 0, "meds": 0}   # dataset default for top_k_med=-1 (0 = no limit); others 300


def top_k(cfg, key: str, dataset: str) -> int:
    k = int(cfg[key])
    if key == "top_k_med" and k < 0:
        k = DEFAULT_TOP_K_MED.get(dataset, 300)
    return max(k, 0)


def _ranked(counter: Counter) -> List[str]:
    return [t for t, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]


def filter_top_k(raw: RawCohort, cfg) -> Tuple[List[Patient], Dict[str, List[str]]]:
    """Keep the top-k tokens per channel; drop visits left without a required channel and
    patients left without visits (counted in raw.drops)."""
    keep = {}
    for chan, _, key in CHAN:
        c = Counter(t for p in raw.patients for v in p.visits for t in getattr(v, chan))
        k = top_k(cfg, key, raw.dataset)
        ranked = _ranked(c)
        kept = ranked[:k] if k > 0 else ranked
        removed = sum(c[t] for t in ranked[len(kept):])
        raw.drops.add(f"{chan}: code occurrences outside top-{k}", removed)
        keep[chan] = set(kept)
    patients, n_empty = [], 0
    for p in progress(raw.patients, desc="top-k filter", unit="patient"):
        visits = []
        for v in p.visits:
            nv = Visit(v.id, v.time, *(tuple(t for t in getattr(v, ch) if t in keep[ch]) for ch, _, _ in CHAN))
            if all(getattr(nv, ch) for ch in raw.required):
                visits.append(nv)
            else:
                n_empty += 1
        if visits:
            patients.append(Patient(p.id, raw.visit_profiles[visits[-1].id], tuple(visits)))
    raw.drops.add("visits emptied by the top-k filters", n_empty)
    raw.drops.add("patients without a visit after the top-k filters", len(raw.patients) - len(patients))
    vocab = {}
    for chan, short, _ in CHAN:
        vocab[short] = _ranked(Counter(t for p in patients for v in p.visits for t in getattr(v, chan)))
    return patients, vocab


def split_patients(ids: Sequence[str], cfg) -> Dict[str, List[str]]:
    """8:1:1 (configurable) by patient: train=int(f0*N), val=int(f1*N), test=rest. `random` shuffles
    the naturally sorted ids with a seeded permutation; `sequential` keeps ascending id order."""
    ids = sorted(ids, key=id_key)
    n = len(ids)
    fr = [float(x) for x in cfg.split_fractions]
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"config split_fractions={tuple(cfg.split_fractions)}: need 3 non-negative numbers summing to 1")
    if cfg.split == "random":
        ids = [ids[i] for i in np.random.default_rng(int(cfg.split_seed)).permutation(n)]
    elif cfg.split != "sequential":
        raise ValueError(f"config split={cfg.split!r}: expected 'random' or 'sequential'")
    n_tr, n_va = int(fr[0] * n), int(fr[1] * n)
    parts = {"train": ids[:n_tr], "val": ids[n_tr:n_tr + n_va], "test": ids[n_tr + n_va:]}
    return {k: sorted(v, key=id_key) for k, v in parts.items()}


def given_splits(raw: RawCohort, ids: Sequence[str]) -> Dict[str, List[str]]:
    """The source's own split (MEDS subject_splits); a cohort patient it does not name is dropped (counted)."""
    parts = {s: [] for s in SPLITS}
    for pid in sorted(ids, key=id_key):
        sp = raw.splits.get(pid)
        if sp is None:
            raw.drops.add("patients not in the split file", 1)
        else:
            parts[sp].append(pid)
    if not any(parts.values()):
        raise ValueError(f"{raw.dataset}: the split file names none of the {len(ids)} cohort patients")
    return parts


def make_samples(p: Patient, protocol: str, visit_profiles: Dict[str, Dict[str, str]]) -> List[Sample]:
    if protocol == "last_visit":
        return [Sample(p.id, p.id, p.visits, dict(visit_profiles[p.visits[-1].id]))]
    if protocol == "per_visit":
        return [Sample(f"{p.id}/{v.id}", p.id, p.visits[:i + 1], dict(visit_profiles[v.id]))
                for i, v in enumerate(p.visits)]
    raise ValueError(f"config protocol={protocol!r}: expected 'last_visit' or 'per_visit'")


def build(raw: RawCohort, cfg) -> PreparedData:
    patients, tokens = filter_top_k(raw, cfg)
    if not patients:
        raise ValueError(f"{raw.dataset}: no patient left in the cohort (drops: {raw.drops.as_dict()})")
    by_id = {p.id: p for p in patients}
    split_ids = split_patients(list(by_id), cfg) if raw.splits is None else given_splits(raw, list(by_id))
    splits = {s: [x for pid in split_ids[s] for x in make_samples(by_id[pid], cfg.protocol, raw.visit_profiles)]
              for s in SPLITS}
    fields = raw.profile_fields
    prof_vocab = {f: (UNKNOWN,) + tuple(sorted({s.profile.get(f, UNKNOWN) for s in splits["train"]} - {UNKNOWN}))
                  for f in fields}
    all_tokens = set(tokens["diag"]) | set(tokens["proc"]) | set(tokens["med"])
    names = {t: raw.names[t] for t in sorted(all_tokens) if t in raw.names}
    vocab = Vocab(tuple(tokens["diag"]), tuple(tokens["proc"]), tuple(tokens["med"]), names, prof_vocab)
    ddi = None
    if raw.ddi_pairs is not None:
        ddi = mappings.ddi_matrix(list(vocab.med), raw.ddi_pairs)
    stats = compute_stats(raw, patients, splits, vocab, ddi, cfg)
    data = PreparedData(raw.dataset, vocab, ddi, splits, stats)
    data.report = render_report(data, raw.notes)
    return data


def compute_stats(raw: RawCohort, patients, splits, vocab: Vocab, ddi, cfg) -> dict:
    visits = [v for p in patients for v in p.visits]
    n_visits = len(visits)
    per = lambda ch: [len(getattr(v, ch)) for v in visits]  # noqa: E731
    stats = {
        "dataset": raw.dataset,
        "n_patients": len(patients),
        "n_visits": n_visits,
        "n_samples": {s: len(splits[s]) for s in SPLITS},
        "n_patients_split": {s: len({x.patient_id for x in splits[s]}) for s in SPLITS},
        "n_single_visit": {s: sum(x.single_visit for x in splits[s]) for s in SPLITS},
        "n_diag": len(vocab.diag), "n_proc": len(vocab.proc), "n_med": len(vocab.med),
        "avg_meds_per_visit": round(float(np.mean(per("medications"))), 6),
        "avg_diag_per_visit": round(float(np.mean(per("diagnoses"))), 6),
        "avg_proc_per_visit": round(float(np.mean(per("procedures"))), 6),
        "avg_visits_per_patient": round(n_visits / len(patients), 6),
        "max_visits_per_patient": max(len(p.visits) for p in patients),
        "max_codes_per_visit": {"diag": max(per("diagnoses")), "proc": max(per("procedures")),
                                "med": max(per("medications"))},
        "n_patients_multi_visit": sum(len(p.visits) >= 2 for p in patients),
        "dropped": raw.drops.as_dict(),
        "ddi": ({"available": True, "graph": "TWOSIDES ATC-3, legacy TOPK=40 (least-frequent) selection",
                 "n_pairs": int(ddi.sum() // 2), "n_med_covered": int(len(vocab.med))}
                if ddi is not None else
                {"available": False, "graph": None,
                 "note": "no DDI graph exists for this drug vocabulary; DDI rate is not available (not zero)"}),
        "config": {k: _plain(cfg[k]) for k in ("protocol", "visit_order", "split", "split_seed",
                                               "split_fractions", "top_k_diag", "top_k_proc", "top_k_med",
                                               "min_admissions", "sample_fraction", "sample_seed")},
    }
    stats["config"]["top_k_med"] = top_k(cfg, "top_k_med", raw.dataset)
    return stats


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
