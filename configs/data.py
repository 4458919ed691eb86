"""Data preparation config: `python -m leader_jax.data.prepare --config configs/data.py
--config.dataset=mimic3|mimic4|eicu|meds [--config.raw_dir=DIR] --out OUT`."""
from pathlib import Path

from ml_collections import ConfigDict

DATA = Path(__file__).resolve().parents[1] / "data"


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.dataset = "eicu"                 # mimic3 | mimic4 | eicu | meds (a MEDS dataset, see the meds block)
    c.raw_dir = ""                     # "" -> the bundled demo data/<dataset>_demo (meds: the eICU demo,
                                       #     exported to MEDS first)
    c.out = ""                         # set by --out
    c.protocol = "last_visit"          # last_visit (paper) | per_visit
    c.visit_order = "admittime"        # admittime (parsed; ties: hadm_id) | hadm_id (the original's order)
    c.split = "random"                 # random (seeded patient shuffle) | sequential (original)
    c.split_seed = 42
    c.split_fractions = (0.8, 0.1, 0.1)
    c.top_k_med = -1                   # -1: dataset default (MIMIC 300 as the paper; eICU no limit, so the
                                       #     stated cohort is kept); 0: no limit
    c.top_k_diag = 2000
    c.top_k_proc = 1000
    c.min_admissions = 1               # 2 reproduces the original's >=2-admission filter on PRESCRIPTIONS
    c.sample_fraction = 1.0            # 0.15 reproduces the original MIMIC-IV patient sample (full data)
    c.sample_seed = 42
    c.eicu_drop_cancelled = False      # eICU: True drops orders with drugordercancelled = Yes (1 stay fewer
                                       #     on the demo); False keeps the stated cohort 1,262 / 1,584
    # mapping files (keep the WHO names a config value: CC BY-NC-SA 4.0, see data/README.md)
    c.ndc_map = str(DATA / "mappings" / "ndc2RXCUI.txt")
    c.rxcui_atc = str(DATA / "mappings" / "RXCUI2atc4.csv.gz")
    c.ddi_pairs = str(DATA / "mappings" / "ddi_atc3_pairs.csv")
    c.atc_names = str(DATA / "mappings" / "WHO ATC-DDD 2021-12-03.csv")

    # dataset=meds: how MEDS codes become visits and tokens (leader_jax/data/meds_presets.py). A field left
    # empty ("", (), -1) takes the preset's value; "none" switches a string setting off.
    c.meds = ConfigDict()
    c.meds.preset = "auto"             # auto (from metadata/dataset.json) | mimic_iv_meds | meds_etl |
                                       #     eicu_meds | leader_mimic3 | leader_mimic4 | leader_eicu
    c.meds.diagnosis = ()              # ((regex, token template), ...): first match wins, {0!u} strips dots
    c.meds.procedure = ()
    c.meds.medication = ()
    c.meds.profile = ()                # ((field, regex), ...) from in-visit or static rows; "age" without a
                                       #     regex = whole years from the birth code to the visit start
    c.meds.patient_id = ""             # regex on static rows whose group is the patient id (else subject_id)
    c.meds.visit_column = ""           # visit-id column, used when present
    c.meds.visit_time_column = ""      # column holding Visit.time (else the visit start, YYYY-MM-DD HH:MM:SS)
    c.meds.admission = ""              # regexes of the codes opening / closing a stay
    c.meds.discharge = ""
    c.meds.birth = ""
    c.meds.gap_hours = -1.0            # time-gap rule for subjects without stays (0: off)
    c.meds.required = ()               # channels a visit must have
    c.meds.med_map = ""                # ndc_atc3 (the NDC -> RxCUI -> ATC-3 maps above) | CSV code,label[,name]
    c.meds.use_split_file = True       # honour metadata/subject_splits.parquet or data/<split>/ folders
    return c


