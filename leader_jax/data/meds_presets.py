"""MEDS reader settings: the presets for the community ETL conventions and for `export_meds`'s own
output, their merge with the `meds` config block, and the classification of MEDS codes into roles.

MEDS defines neither visits nor a vocabulary, so a preset says which codes are diagnoses, procedures,
medications (a regex whose groups fill a token template), which give profile fields, how to find stays
(a visit-id column, admission/discharge codes, or a time-gap rule) and which channels a visit must have.
A config field left empty ("", (), -1) takes the preset's value; a set one replaces it.

Token templates are `str.format` strings over the regex groups; `{0!u}` removes the dots of a group so
that dotted (`ICD9CM/401.9`) and undotted (`DIAGNOSIS//ICD//9//4019`) codes give one token.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

CHANNELS = ("diagnoses", "procedures", "medications")
UNK = "UNK"

_MIMIC_BASE = dict(
    diagnosis=((r"^DIAGNOSIS//ICD//(9|10)//([^/]+)$", "dx{0}:{1!u}"),),
    procedure=((r"^PROCEDURE//ICD//(9|10)//([^/]+)$", "px{0}:{1!u}"),),
    medication=((r"^MEDICATION//START//(.+)$", "{0}"),),
    profile=(("insurance", r"^INSURANCE//(.+)$"), ("language", r"^LANGUAGE//(.+)$"),
             ("admission_type", r"^HOSPITAL_ADMISSION//([^/]+)//"), ("marital_status", r"^MARITAL_STATUS//(.+)$"),
             ("race", r"^RACE//(.+)$"), ("gender", r"^GENDER//(.+)$"), ("age", "")),
    patient_id="", visit_column="hadm_id", visit_time_column="",
    admission=r"^HOSPITAL_ADMISSION//", discharge=r"^HOSPITAL_DISCHARGE//", birth=r"^MEDS_BIRTH$",
    gap_hours=24.0, required=CHANNELS, med_map="",
)

PRESETS: Dict[str, dict] = {
    # MIMIC_IV_MEDS: codes with `//`, hadm_id column, medications (pharmacy) by drug name without hadm_id
    "mimic_iv_meds": dict(_MIMIC_BASE),
    # meds_etl (OMOP and MIMIC flavours): `/`, dotted ICD codes, visit_id column, flat data/
    "meds_etl": dict(
        _MIMIC_BASE,
        diagnosis=((r"^ICD(9|10)CM/([^/]+)$", "dx{0}:{1!u}"),),
        procedure=((r"^ICD(9|10)(?:PCS|Proc)/([^/]+)$", "px{0}:{1!u}"),),
        medication=((r"^(?:NDC|RxNorm|MIMIC_IV_Drug)/(.+)$", "{0}"),),
        profile=(("gender", r"^(?:Gender|GENDER)/(.+)$"), ("race", r"^(?:Race|RACE)/(.+)$"), ("age", "")),
        visit_column="visit_id", admission=r"^Visit/", discharge="", birth=r"^(?:MEDS_BIRTH|Birth/birth)$"),
    # eICU_MEDS: ICD-9 diagnoses as written (dotted), treatments as the procedure channel, no procedure
    # requirement (eICU stays often have none)
    "eicu_meds": dict(
        diagnosis=((r"^DIAGNOSIS//ICD//9//([^/,]+)$", "dx9:{0}"), (r"^DIAGNOSIS//STRING//(.+)$", "dxs:{0}")),
        procedure=((r"^TREATMENT//ENTERED//(.+)$", "tx:{0}"),),
        medication=((r"^MEDICATION//STARTED//(.+)$", "{0}"),),
        profile=(("gender", r"^GENDER//(.+)$"), ("age", r"^AGE//(.+)$"), ("ethnicity", r"^ETHNICITY//(.+)$"),
                 ("unittype", r"^UNITTYPE//(.+)$"), ("unitadmitsource", r"^UNITADMITSOURCE//(.+)$")),
        patient_id=r"^UNIQUEPID//(.+)$", visit_column="patientunitstayid", visit_time_column="visit_key",
        admission=r"^(?:ICU|HOSPITAL)_ADMISSION//", discharge=r"^(?:ICU|HOSPITAL)_DISCHARGE//", birth="",
        gap_hours=24.0, required=("diagnoses", "medications"), med_map=""),
}
# export_meds's output: the community codes plus what makes the round trip exact (NDC medication codes
# mapped NDC -> RxCUI -> ATC-3, the dataset's own profile fields, the HICL drug code)
PRESETS["leader_mimic4"] = dict(PRESETS["mimic_iv_meds"], medication=((r"^MEDICATION//START//(\d+)$", "{0}"),),
                                med_map="ndc_atc3")
PRESETS["leader_mimic3"] = dict(
    PRESETS["leader_mimic4"],
    profile=(("insurance", r"^INSURANCE//(.+)$"), ("language", r"^LANGUAGE//(.+)$"),
             ("religion", r"^RELIGION//(.+)$"), ("marital_status", r"^MARITAL_STATUS//(.+)$"),
             ("ethnicity", r"^ETHNICITY//(.+)$"), ("gender", r"^GENDER//(.+)$"), ("age", "")))
PRESETS["leader_eicu"] = dict(PRESETS["eicu_meds"],
                              medication=((r"^MEDICATION//STARTED//HICL//(\d+)$", "hicl:{0}"),))

EXPORT_ETL = "leader_jax.data.export_meds"
EXPORT_PRESET = {"mimic3_demo": "leader_mimic3", "mimic4_demo": "leader_mimic4", "eicu_demo": "leader_eicu"}


@dataclass(frozen=True)
class Settings:
    """The effective MEDS reader settings (preset merged with the config's `meds` block)."""
    preset: str
    diagnosis: tuple
    procedure: tuple
    medication: tuple
    profile: tuple
    patient_id: str
    visit_column: str
    visit_time_column: str
    admission: str
    discharge: str
    birth: str
    gap_hours: float
    required: tuple
    med_map: str
    use_split_file: bool


class _Formatter(string.Formatter):
    def convert_field(self, value, conversion):
        if conversion == "u":
            return value.replace(".", "")
        return super().convert_field(value, conversion)


FORMAT = _Formatter()


def auto_preset(root: Path) -> str:
    """The preset named by metadata/dataset.json: export_meds's datasets, MIMIC_IV_MEDS, eICU_MEDS, meds_etl."""
    meta = root / "metadata" / "dataset.json"
    try:
        d = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        d = {}
    etl, name = str(d.get("etl_name") or ""), str(d.get("dataset_name") or "")
    if etl == EXPORT_ETL and name in EXPORT_PRESET:
        return EXPORT_PRESET[name]
    low = etl.lower().replace("-", "_")
    for key, preset in (("mimic_iv", "mimic_iv_meds"), ("eicu", "eicu_meds"), ("meds_etl", "meds_etl")):
        if key in low:
            return preset
    raise ValueError(f"{root}: config meds.preset='auto' cannot tell the convention (metadata/dataset.json "
                     f"etl_name={etl!r}); set --config.meds.preset to one of {', '.join(PRESETS)}")


def settings(mcfg, root: Optional[Path] = None) -> Settings:
    """Merge the `meds` config block into its preset ('auto' reads metadata/dataset.json under root)."""
    name = mcfg.preset
    if name == "auto":
        if root is None:
            raise ValueError("config meds.preset='auto' needs the dataset folder")
        name = auto_preset(root)
    base = PRESETS[name]
    vals = {}
    for k in ("diagnosis", "procedure", "medication", "profile", "patient_id", "visit_column", "visit_time_column",
              "admission", "discharge", "birth", "required", "med_map"):
        v = mcfg[k]
        vals[k] = base[k] if v in ("", ()) else (v if isinstance(v, str) else tuple(tuple(x) if isinstance(x, (list, tuple)) else x for x in v))
    vals["gap_hours"] = base["gap_hours"] if float(mcfg.gap_hours) < 0 else float(mcfg.gap_hours)
    for k in ("patient_id", "visit_column", "visit_time_column", "admission", "discharge", "birth", "med_map"):
        if vals[k] == "none":
            vals[k] = ""
    return Settings(preset=name, use_split_file=bool(mcfg.use_split_file), **vals)


def check(s: Settings) -> None:
    """ValueError naming the `meds.<field>` whose value cannot work (bad regex, template, channel)."""
    def bad(field, why):
        raise ValueError(f"config meds.{field}: {why}")

    for field in ("diagnosis", "procedure", "medication"):
        for entry in getattr(s, field):
            if not (isinstance(entry, tuple) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
                bad(field, f"expected ((regex, token template), ...), got {entry!r}")
            rx = _compile(entry[0], field, bad)
            try:
                FORMAT.format(entry[1], *(["x"] * rx.groups))
            except (IndexError, KeyError, ValueError) as e:
                bad(field, f"token template {entry[1]!r} does not fit regex {entry[0]!r} ({e})")
    for entry in s.profile:
        if not (isinstance(entry, tuple) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            bad("profile", f"expected ((field, regex), ...), got {entry!r}")
        if entry[1]:
            _compile(entry[1], "profile", bad)
    for field in ("patient_id", "admission", "discharge", "birth"):
        if getattr(s, field):
            _compile(getattr(s, field), field, bad)
    unknown = [c for c in s.required if c not in CHANNELS]
    if unknown or not s.required:
        bad("required", f"expected a non-empty subset of {', '.join(CHANNELS)}, got {s.required!r}")
    if s.gap_hours < 0:
        bad("gap_hours", "expected hours >= 0 (0: no time-gap rule)")


def _compile(rx: str, field: str, bad):
    try:
        return re.compile(rx)
    except re.error as e:
        bad(field, f"bad regex {rx!r} ({e})")


@dataclass(frozen=True)
class Role:
    """What one MEDS code means to the reader (computed once per distinct code)."""
    chan: int = -1                  # index into CHANNELS, -1: none
    token: str = ""
    field: int = -1                 # index into Settings.profile, -1: none
    value: str = ""
    admission: bool = False
    discharge: bool = False
    birth: bool = False
    patient_id: str = ""
    unk: bool = False               # matched a channel but a part was the literal UNK
    unmapped: bool = False          # a medication without a label in the map


def classify(code: str, s: Settings, med_map: Optional[Dict[str, str]], compiled) -> Role:
    r = {}
    for ci, pats in enumerate(compiled["chan"]):
        for rx, tmpl in pats:
            m = rx.match(code)
            if m is None:
                continue
            groups = m.groups() or (m.group(0),)
            if any(g is not None and (g == UNK or g.endswith("//" + UNK)) for g in groups):
                return Role(unk=True)
            tok = FORMAT.format(tmpl, *[g or "" for g in groups])
            if ci == 2 and med_map is not None:
                label = med_map.get(tok)
                if label is None:
                    return Role(unmapped=True)
                tok = label
            r.update(chan=ci, token=tok)
            break
        if r:
            break
    for fi, rx in enumerate(compiled["profile"]):
        m = rx.match(code) if rx is not None else None
        if m is not None:
            v = (m.groups() or (m.group(0),))[0] or ""
            r.update(field=fi, value="" if v == UNK else v)
            break
    for key in ("admission", "discharge", "birth"):
        rx = compiled[key]
        if rx is not None and rx.match(code):
            r[key] = True
    if compiled["patient_id"] is not None:
        m = compiled["patient_id"].match(code)
        if m is not None:
            r["patient_id"] = (m.groups() or (m.group(0),))[0] or ""
    return Role(**r)


def compile_settings(s: Settings) -> dict:
    opt = lambda rx: re.compile(rx) if rx else None  # noqa: E731
    return {"chan": [[(re.compile(rx), t) for rx, t in getattr(s, f)] for f in ("diagnosis", "procedure", "medication")],
            "profile": [opt(rx) for _, rx in s.profile], "admission": opt(s.admission),
            "discharge": opt(s.discharge), "birth": opt(s.birth), "patient_id": opt(s.patient_id)}

