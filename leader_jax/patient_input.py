"""The patient JSON schema of `python -m leader_jax.predict`: parsing, checking and code resolution.

One JSON object per patient (one per line in a JSONL file):

    {"id": "p1",                                     # optional; default "line<N>" / "patient<N>"
     "profile": {"gender": "F", "age": "70-79"},     # optional; fields of the run's profile vocabulary
     "visits": [                                      # oldest → newest; the LAST visit is the current one
        {"diagnoses": ["4019", "dx9:25000"], "procedures": ["3893"], "medications": ["N02B"]},
        {"diagnoses": ["41401"], "procedures": []}]}

Codes are written in the source vocabulary the run was prepared with, either bare ("4019", "N02B",
eICU strings) or with the prepared data's namespace ("dx9:4019", "dx10:I10", "px9:3893", "atc:N02B",
"tx:...", "hicl:..."). A bare code is looked up under every namespace of its field; ICD codes may be
written with a dot ("401.9"). A bare code that exists under two namespaces (an ICD-9 and an ICD-10 code
spelled alike) is ambiguous and reported, never guessed. The current visit's medications are ignored:
they are what the model predicts.

Nothing unknown is silently ignored: every code outside the run's vocabulary (and every profile
field or value the run never saw) is listed in `unknown_codes`. History visits left without any known
code are dropped (listed in `dropped_visits`). A patient whose current visit has no known diagnosis or
procedure gets no prediction (`PatientInput.no_prediction` says why).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from leader_jax.data.dataset import UNKNOWN, Sample
from leader_jax.data.records import Visit

FIELDS = ("diagnoses", "procedures", "medications")
VOCAB_OF = {"diagnoses": "diag", "procedures": "proc", "medications": "med"}
# The namespaces of the prepared tokens, per field (see leader_jax/data/records.py).
NAMESPACES = {"diagnoses": ("dx9", "dx10", "dxs"), "procedures": ("px9", "px10", "tx"),
              "medications": ("atc", "hicl")}
_AMBIGUOUS = object()
_VISIT_KEYS = frozenset(FIELDS) | {"id", "time"}
_PATIENT_KEYS = frozenset({"id", "profile", "visits"})


class PatientError(ValueError):
    """A patient object that does not follow the schema (the message names the offending part)."""


@dataclasses.dataclass
class PatientInput:
    """One checked patient: the `Sample` the models encode (None when no prediction is possible) and
    what could not be used."""

    id: str
    sample: Sample | None
    unknown_codes: list[dict[str, Any]]
    dropped_visits: list[int]
    no_prediction: str = ""          # why no prediction is made ("" = a prediction is made)


class CodeResolver:
    """Bare or namespaced input codes → prepared tokens of one vocabulary (one dict lookup per code)."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.table: dict[str, dict[str, str]] = {}        # code → token (unambiguous codes only)
        self.ambiguous: dict[str, set[str]] = {}           # bare codes that exist under several namespaces
        for f in FIELDS:
            table: dict[str, str] = {}
            bare: dict[str, Any] = {}
            for tok in getattr(vocab, VOCAB_OF[f]):
                table[tok] = tok
                ns, sep, code = tok.partition(":")
                if sep and ns in NAMESPACES[f]:
                    bare[code] = tok if code not in bare else _AMBIGUOUS
            self.ambiguous[f] = {c for c, t in bare.items() if t is _AMBIGUOUS and c not in table}
            for code, tok in bare.items():
                if tok is not _AMBIGUOUS:
                    table.setdefault(code, tok)
            self.table[f] = table
        self.profile_values = {k: set(v) for k, v in vocab.profile.items()}

    def resolve(self, field: str, code: str) -> tuple[str | None, str]:
        """(token, "") or (None, reason)."""
        table = self.table[field]
        tok = table.get(code)
        if tok is None and "." in code:
            tok = table.get(code.replace(".", ""))
        if tok is not None:
            return tok, ""
        if code in self.ambiguous[field] or code.replace(".", "") in self.ambiguous[field]:
            return None, "ambiguous: exists under several namespaces; prefix it (e.g. dx9:, dx10:)"
        return None, "not in the run's vocabulary"

    def tokens(self, field: str, codes: Any, visit: int, unknown: list) -> list[str]:
        """The known tokens of a code list (first-appearance order, unique); unknown codes are appended
        to `unknown`. Fast path: every code is a string found as is."""
        if codes is None:
            return []
        if type(codes) is list:
            table = self.table[field]
            try:
                got = [table.get(c) for c in codes]
            except TypeError:                  # an unhashable entry: reported by the slow path
                got = [None]
            if None not in got:
                return list(dict.fromkeys(got)) if len(got) > 1 else got
        out: list[str] = []
        for c in _strings(codes, f"visits[{visit}].{field}"):
            tok, why = self.resolve(field, c)
            if tok is None:
                unknown.append({"visit": visit, "field": field, "code": c, "reason": why})
            elif tok not in out:
                out.append(tok)
        return out


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PatientError(f"{where} must be a list of codes, got {type(value).__name__}")
    if all(type(c) is str for c in value):
        return [c.strip() for c in value]
    out = []
    for c in value:
        if isinstance(c, bool) or not isinstance(c, (str, int)):
            raise PatientError(f"{where} holds {c!r}; codes are strings")
        out.append(str(c).strip())
    return out


def parse_patient(obj: Any, resolver: CodeResolver, default_id: str) -> PatientInput:
    """Check one patient object against the schema and resolve its codes (PatientError on a schema error)."""
    if not isinstance(obj, dict):
        raise PatientError(f"a patient must be a JSON object, got {type(obj).__name__}")
    if len(obj.keys() - _PATIENT_KEYS):
        raise PatientError(f"unknown field(s) {sorted(obj.keys() - _PATIENT_KEYS)}; a patient has id, profile, visits")
    pid = obj.get("id", default_id)
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise PatientError(f"id must be a string, got {pid!r}")
    pid = str(pid)
    visits = obj.get("visits")
    if not isinstance(visits, list) or not visits:
        raise PatientError("visits must be a non-empty list (oldest → newest; the last is the current visit)")
    unknown: list[dict[str, Any]] = []
    kept: list[Visit] = []
    dropped: list[int] = []
    last = len(visits) - 1
    current_known = False
    for v, visit in enumerate(visits):
        if not isinstance(visit, dict):
            raise PatientError(f"visits[{v}] must be an object with diagnoses / procedures / medications")
        if len(visit.keys() - _VISIT_KEYS):
            bad = sorted(visit.keys() - _VISIT_KEYS)
            raise PatientError(f"visits[{v}]: unknown field(s) {bad}; a visit has {list(FIELDS)} (+ id, time)")
        dx = resolver.tokens("diagnoses", visit.get("diagnoses"), v, unknown)
        px = resolver.tokens("procedures", visit.get("procedures"), v, unknown)
        if v == last:
            _strings(visit.get("medications"), f"visits[{v}].medications")  # checked; the current visit's
            med: list[str] = []                                                # drugs are the target, never input
            current_known = bool(dx or px)
        else:
            med = resolver.tokens("medications", visit.get("medications"), v, unknown)
            if not (dx or px or med):
                dropped.append(v)
                continue
        kept.append(Visit(id=str(visit.get("id", v)), time=str(visit.get("time", v)),
                          diagnoses=tuple(dx), procedures=tuple(px), medications=tuple(med)))
    profile = obj.get("profile") or {}
    if not isinstance(profile, dict):
        raise PatientError(f"profile must be an object of field: value, got {type(profile).__name__}")
    prof: dict[str, str] = {}
    for k, val in profile.items():
        val = str(val)
        if k not in resolver.profile_values:
            unknown.append({"field": f"profile.{k}", "code": val, "reason": "profile field not used by the run"})
        else:
            if val not in resolver.profile_values[k]:
                unknown.append({"field": f"profile.{k}", "code": val,
                                "reason": f"value not seen in training; encoded as {UNKNOWN!r}"})
            prof[k] = val
    if not current_known:
        return PatientInput(pid, None, unknown, dropped,
                            "the current (last) visit has no diagnosis or procedure code in the run's vocabulary")
    return PatientInput(pid, Sample(id=pid, patient_id=pid, visits=tuple(kept), profile=prof), unknown, dropped)


@dataclasses.dataclass
class ParsedLine:
    """One input line: a checked patient, or the error that made it unusable."""

    line: int
    patient: PatientInput | None = None
    error: str = ""


def parse_lines(lines, resolver: CodeResolver, first_line: int = 1) -> list[ParsedLine]:
    """Parse JSONL lines (blank lines skipped); a malformed line becomes a ParsedLine with its error."""
    out = []
    for n, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            out.append(ParsedLine(n, error=f"line {n}: not valid JSON ({e.msg} at column {e.colno})"))
            continue
        try:
            out.append(ParsedLine(n, parse_patient(obj, resolver, f"line{n}")))
        except PatientError as e:
            out.append(ParsedLine(n, error=f"line {n}: {e}"))
    return out


def sample_to_patient(sample: Sample) -> dict[str, Any]:
    """A prepared sample written in the input schema (namespaced codes): what a user would send."""
    return {"id": sample.id, "profile": dict(sample.profile),
            "visits": [{"diagnoses": list(v.diagnoses), "procedures": list(v.procedures),
                        "medications": list(v.medications)} for v in sample.visits]}
