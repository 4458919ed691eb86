"""Human-readable `report.md` for a prepared dataset (deterministic: no timings, no paths)."""
from __future__ import annotations

from leader_jax.data.dataset import SPLITS

COHORT = {
    "mimic3": "a visit is an admission (hadm_id) with ≥1 diagnosis, ≥1 procedure and ≥1 drug mapping "
              "NDC → RxCUI → ATC-3 into the label space; every patient with ≥1 such visit is kept",
    "mimic4": "a visit is an admission (hadm_id) with ≥1 diagnosis, ≥1 procedure and ≥1 drug mapping "
              "NDC → RxCUI → ATC-3 into the label space; every patient with ≥1 such visit is kept",
    "eicu": "a visit is an ICU unit stay (patientunitstayid) with ≥1 diagnosis and ≥1 HICL-coded "
            "drug order; a patient is a uniquepid; every patient with ≥1 such stay is kept",
    "meds": "a visit is a stay of a MEDS dataset (visit-id column, admission → discharge codes or a time-gap "
            "rule) holding every required channel; codes and labels as the `meds` config and preset define "
            "them; every patient with ≥1 such visit is kept",
}


def render_report(data, notes=()) -> str:
    s = data.stats
    cfg = s.get("config", {})
    lines = [f"# Prepared dataset: {data.dataset}", "",
             f"Cohort: {COHORT.get(data.dataset, COHORT['mimic3'])}.", "",
             f"Protocol `{cfg.get('protocol')}`, visit order `{cfg.get('visit_order')}`, split "
             f"`{cfg.get('split')}` (seed {cfg.get('split_seed')}, fractions {cfg.get('split_fractions')}).", "",
             "| quantity | value |", "|---|---|",
             f"| patients | {s['n_patients']} |", f"| visits | {s['n_visits']} |",
             f"| patients with ≥2 visits | {s['n_patients_multi_visit']} |",
             f"| diagnosis / procedure / drug vocabulary | {s['n_diag']} / {s['n_proc']} / {s['n_med']} |",
             f"| mean drugs per visit | {s['avg_meds_per_visit']:.3f} |",
             f"| mean visits per patient | {s['avg_visits_per_patient']:.3f} |"]
    for sp in SPLITS:
        lines.append(f"| {sp}: samples (single-visit) | {s['n_samples'][sp]} ({s['n_single_visit'][sp]}) |")
    ddi = s["ddi"]
    lines += ["", "DDI: " + (f"{ddi['graph']}, {ddi['n_pairs']} interacting pairs inside the label space."
                            if ddi["available"] else ddi["note"] + "."), "",
              "## Dropped (reason: rows, or visits/patients where the reason says so)", ""]
    if s["dropped"]:
        lines += ["| reason | count |", "|---|---|"] + [f"| {_cell(k)} | {v} |" for k, v in s["dropped"].items()]
    else:
        lines.append("nothing dropped")
    for n in notes:
        lines += ["", n]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """A markdown table cell: `|` escaped (drop reasons may quote an eICU path string as an example)."""
    return text.replace("|", "\\|")
