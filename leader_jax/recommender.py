"""`Recommender`: a trained run (student or teacher) as a drug recommender for new patients.

    from leader_jax import Recommender
    rec = Recommender.load("runs/student")                 # configs/predict.py defaults
    rec = Recommender.load("runs/student", ddi_filter="drop_lower", top_k=5)
    results = rec.predict([{"visits": [{"diagnoses": ["4019"], "procedures": ["3893"]}]}])

Each result is the JSON object `python -m leader_jax.predict` writes for that patient (schema in
docs/predict.md; input schema in `leader_jax.patient_input`). Patients are encoded from the run's
prepared-data vocabulary exactly as the model was trained (the student's `encode_samples`, the
teacher's prompts), so a prepared test patient gets the probabilities of the run's
`predictions/test.npz`. The model itself is reached through one adapter per model kind
(`_student_backend`, `_teacher_backend`), the only places that know the training code's API.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from ml_collections import ConfigDict

from leader_jax import ddi_safety
from leader_jax.cli import UserError, load_config
from leader_jax.patient_columns import OK, Records, records_from_parsed
from leader_jax.patient_input import CodeResolver, PatientInput, parse_lines, parse_patient
from leader_jax.predict_render import PROB_DIGITS, Renderer  # noqa: F401  (PROB_DIGITS: part of the API)


# ------------------------------------------------------------------------------------- model adapters
def _read_config(run: Path) -> ConfigDict:
    path = run / "config.json"
    if not path.is_file():
        raise UserError(f"{run}: config.json not found (not a training run folder?)")
    try:
        return ConfigDict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None


def _student_backend(run: Path, meta: dict, data, cfg: ConfigDict) -> Callable[[Sequence], np.ndarray]:
    """samples → probabilities [n, n_med] with the run's best student parameters (the student trainer's
    own restore and predict paths)."""
    from leader_jax.train import student_inputs as si
    from leader_jax.train import student_trainer as st

    rcfg = _read_config(run)
    if not meta.get("finished") or "buckets" not in meta:
        raise UserError(f"{run}: the student run is not finished (run.json finished={meta.get('finished')}); "
                        "finish it (re-run the same training command) before predicting")
    teacher_dim = None
    if rcfg.distill:     # the KD projector (head_hidden + 1) × teacher_dim is trained, though unused at inference
        extra = int(meta["n_params"]) - int(meta["n_params_inference"])
        teacher_dim = extra // (int(rcfg.model.head_hidden) + 1) or None
    if "shared_embedding" not in rcfg.model:     # a run saved before the switch existed: separate tables
        rcfg.model.shared_embedding = False
    if "retrieval" not in rcfg:                  # a run saved before the retrieval block existed: mode none
        rcfg.retrieval = load_config("retrieval.py")
    neighbours = _student_neighbours(run, rcfg, data)
    mcfg = st.model_config(rcfg, data.vocab, teacher_dim)
    trainer = st.StudentTrainer(mcfg, st.loss_config(rcfg), lr=float(rcfg.train.lr), seed=int(rcfg.seed),
                                inference_kernel=str(rcfg.model.inference_kernel))
    try:
        st.restore_params(run, trainer)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{run}/checkpoints: cannot restore the student ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    caps = [tuple(int(x) for x in c) for c in meta["buckets"]]
    max_visits = int(rcfg.model.max_visits)

    def encode(samples: Sequence):
        return si.encode_samples(samples, data.vocab, max_visits)

    def model(enc) -> np.ndarray:
        if neighbours is not None and enc.nbr is None:   # the neighbours' drug bags, from the codes alone
            enc.nbr = si.neighbour_bags(neighbours, enc, data.vocab)
        top = np.maximum(np.asarray(caps[-1]), enc.needs.max(axis=0)) if len(enc) else np.asarray(caps[-1])
        run_caps = caps[:-1] + [tuple(int(x) for x in top)]      # new patients may need wider sets
        try:
            return trainer.predict(enc, run_caps, cfg.batch_size)
        except ValueError:     # a patient larger than the first chunk's batch budgets: size them anew
            trainer.steps.layouts.clear()
            return trainer.predict(enc, run_caps, cfg.batch_size)

    def predict(samples: Sequence) -> np.ndarray:
        return model(encode(samples))

    predict.encode, predict.model, predict.trainer = encode, model, trainer     # column-wise inputs, benchmarks
    predict.max_visits = max_visits
    return predict


def _student_neighbours(run: Path, rcfg: ConfigDict, data):
    """The retrieval of a student run trained with mode fixed (its saved memory; pool settings from its
    config), or None for mode none."""
    from leader_jax.retrieval.run_prompts import RunRetrieval

    if rcfg.retrieval.mode == "none":
        return None
    return RunRetrieval.for_run(rcfg.retrieval, run, data.vocab, fingerprint=data.fingerprint())


def _teacher_backend(run: Path, meta: dict, data, cfg: ConfigDict) -> Callable[[Sequence], np.ndarray]:
    """samples → probabilities with the teacher of RUN: base model + adapters + head from its checkpoint,
    prompts from its config (needs the base model folder and the tokenizer the run was trained with). A
    run trained with retrieval (mode fixed or joint) shows each patient its neighbours from
    RUN/retrieval/memory.npz (`_teacher_retrieval`; joint: ranked by the run's re-ranker)."""
    from leader_jax.train import common
    from leader_jax.train import text_batches as tdata
    from leader_jax.train.extract_features import load_teacher_run, restored_engine
    from leader_jax.train import teacher as tt

    from leader_jax.checkpoints import gguf
    from leader_jax.retrieval import run_prompts as rp

    rcfg = _read_config(run)
    tok_path = tt.tokenizer_path(rcfg)
    # a GGUF file or name needs no check here: load_run_tokenizer / load_base name a missing file or wheel
    if not gguf.is_gguf_spec(tok_path) and not (tok_path and Path(tok_path).exists()):
        raise UserError(f"{run}: the teacher needs its tokenizer, but {tok_path or '(none set)'} is missing "
                        "(config.json tokenizer / model.path); restore it at that path to predict")
    if (rcfg.model.source == "hf" and not gguf.is_gguf_spec(rcfg.model.path)
            and not (Path(rcfg.model.path) / "config.json").is_file()):
        raise UserError(f"{run}: the teacher needs its base model, but {rcfg.model.path or '(none set)'} holds "
                        "no HF LLaMA (config.json model.path); restore it at that path to predict")
    tcfg, ckpt, info = load_teacher_run(run, cfg.teacher_checkpoint, tuple(cfg.mesh))
    retr = _teacher_retrieval(run, tcfg, data)
    buckets = tuple(int(b) for b in tcfg.data.length_buckets) or None      # the run's own eval padding
    mesh = common.make_mesh(tcfg)
    common.check_batch_sizes(mesh, {"batch_size": cfg.batch_size})
    tok = common.load_run_tokenizer(tok_path, run)
    special = tdata.SpecialIds.from_tokenizer(tok)
    engine = restored_engine(tcfg, ckpt, info, mesh, data.vocab)
    if retr is not None:
        retr.follow(engine)

    def predict(samples: Sequence) -> np.ndarray:
        kw = dict(max_history=tcfg.data.max_history, profile=tcfg.data.profile, labels=None, overlong="error")
        try:
            if retr is not None:
                samples = rp.unique_ids(samples)       # input ids may repeat; neighbours are looked up by id
                enc = retr.encode(samples, "input", tok, special, tt.eval_max_len(tcfg),
                                  pools=retr.input_pools(samples), **kw)
            else:
                enc = tdata.encode_samples(samples, data.vocab, tok, special, tt.eval_max_len(tcfg),
                                           split="input", **kw)
        except ValueError as e:
            raise UserError(str(e)) from None
        return tt.predict_split(engine, enc, cfg.batch_size, desc="predict", buckets=buckets)[0]

    return predict


def _teacher_retrieval(run: Path, tcfg: ConfigDict, data):
    """None for a teacher without retrieval; else the run's `RunRetrieval` (its saved memory and pool
    settings; new patients get pools built on the fly and prompts encoded as in training by
    `RunRetrieval.encode`). An oracle-pool run is refused here: new patients have no known drugs to rank by."""
    from leader_jax.retrieval import run_prompts as rp

    if tcfg.retrieval.mode != "none" and tcfg.retrieval.similarity == "oracle":
        raise UserError(f"{run}: {rp.oracle_refusal()}")
    return rp.RunRetrieval.for_run(tcfg.retrieval, run, data.vocab, fingerprint=data.fingerprint())


BACKENDS = {"student": _student_backend, "teacher": _teacher_backend}


# ------------------------------------------------------------------------------------------ recommender
class Recommender:
    """A loaded run: `predict(patients)` → one result dict per patient (see docs/predict.md)."""

    def __init__(self, run: Path, cfg: ConfigDict, model: str, data, predict_fn, threshold: float,
                 threshold_source: str):
        self.run, self.cfg, self.model, self.data = run, cfg, model, data
        self.vocab = data.vocab
        self.ddi = data.ddi
        self.threshold = float(threshold)
        self.threshold_source = threshold_source
        self._predict_fn = predict_fn
        self.resolver = CodeResolver(data.vocab)
        self.ddi_graph = ddi_safety.graph_note(data) if data.ddi is not None else None

    @classmethod
    def load(cls, run_dir: str | Path, config: ConfigDict | None = None, **overrides) -> "Recommender":
        """Load RUN (a finished student or teacher run). `config`: a predict config (default:
        configs/predict.py); `overrides`: fields to change, e.g. `ddi_filter="drop_lower"`."""
        from leader_jax.eval import load_prepared, open_run
        from leader_jax.predict import validate_config

        cfg = load_config("predict.py") if config is None else ConfigDict(config.to_dict())
        with cfg.unlocked():
            cfg.run_dir = str(run_dir)
            for k, v in overrides.items():
                if k not in cfg:
                    from leader_jax.cli import unknown_field
                    raise UserError(f"Recommender.load: {unknown_field(cfg, k)}")
                try:
                    cfg[k] = str(v) if k == "threshold" else v        # threshold: "val" or a number
                except TypeError as e:
                    raise UserError(f"Recommender.load: {k}={v!r}: {e}") from None
        validate_config(cfg)
        run, meta = open_run(run_dir, BACKENDS, f"predict works on runs of {sorted(BACKENDS)} "
                                                "(python -m leader_jax.train.student / .teacher)")
        model = meta["model"]
        if not meta.get("data_dir"):
            raise UserError(f"{run / 'run.json'}: names no data_dir (the prepared data the run was trained on)")
        data = load_prepared(meta["data_dir"])
        threshold, source = resolve_threshold(cfg.threshold, run)
        predict_fn = BACKENDS[model](run, meta, data, cfg)
        return cls(run, cfg, model, data, predict_fn, threshold, source)

    # --------------------------------------------------------------------------------------- inputs
    def parse(self, patients: Iterable[Any]) -> list[PatientInput]:
        """Patient objects (dicts in the input schema) → checked inputs; a schema error is a UserError
        naming the patient's position."""
        from leader_jax.patient_input import PatientError

        out = []
        for i, obj in enumerate(patients):
            try:
                out.append(parse_patient(obj, self.resolver, f"patient{i}"))
            except PatientError as e:
                raise UserError(f"patient {i}: {e}") from None
        return out

    def predict_proba(self, inputs: Sequence[PatientInput]) -> np.ndarray:
        """float32 [n, n_med] probabilities; rows of patients without a prediction are NaN."""
        out = np.full((len(inputs), self.vocab.n_med), np.nan, dtype=np.float32)
        rows = [i for i, p in enumerate(inputs) if p.sample is not None]
        if rows:
            out[rows] = self._predict_fn([inputs[i].sample for i in rows])
        return out

    def predict(self, patients: Iterable[Any]) -> list[dict[str, Any]]:
        """One result dict per patient object: the CLI's output lines (without `line`), parsed."""
        inputs = self.parse(patients)
        return self.results(inputs, self.predict_proba(inputs))

    @property
    def visit_order(self) -> str:
        """The visit order the run's data was prepared with (MEDS input orders visits the same way)."""
        from leader_jax.cli import load_config
        return self.data.stats.get("config", {}).get("visit_order") or load_config("data.py").visit_order

    def parse_chunk(self, lines: Sequence[str], first_line: int = 1) -> Records:
        """JSONL lines → `Records` (student runs: column-wise, `leader_jax.patient_columns`)."""
        if self._chunk_parser is not None:
            return self._chunk_parser.parse(lines, first_line)
        return records_from_parsed(parse_lines(lines, self.resolver, first_line))

    def records_proba(self, records: Records) -> np.ndarray:
        """Probabilities [OK records, n_med] of the records that get a prediction."""
        if records.enc is not None:
            return self._predict_fn.model(records.enc)
        if records.samples:
            return self._predict_fn(records.samples)
        return np.zeros((0, self.vocab.n_med), np.float32)

    @functools.cached_property
    def _chunk_parser(self):
        if self.model != "student":
            return None
        from leader_jax.patient_columns import ChunkParser
        return ChunkParser(self.resolver, self._predict_fn.max_visits)

    # --------------------------------------------------------------------------------------- outputs
    @functools.cached_property
    def renderer(self) -> Renderer:
        return Renderer(self.vocab, self.threshold, self.ddi, self.ddi_graph, self.cfg)

    def render(self, inputs: Sequence[PatientInput], probs: np.ndarray) -> list[str]:
        """One JSON object (text) per patient: the drugs ranked by probability (`top_k`), the
        recommended set at the threshold after the DDI filter, the interacting pairs left in it, the
        drugs the filter removed, the unknown codes (`leader_jax.predict_render`). `probs`: as
        `predict_proba` gives them. `predict` parses this text, so the API and the CLI cannot differ."""
        records = records_from_parsed(inputs, lines=False)
        ok = records.kind == OK
        text = self.renderer.render(records, np.asarray(probs)[ok] if len(inputs) else probs)
        return text.decode("utf-8").split("\n")[:-1]

    def results(self, inputs: Sequence[PatientInput], probs: np.ndarray) -> list[dict[str, Any]]:
        """`render`, parsed."""
        return [json.loads(x) for x in self.render(inputs, probs)]


def resolve_threshold(spec: str, run: Path) -> tuple[float, str]:
    """(θ, where it came from): "val" = the threshold maximising mean Jaccard on the run's validation
    predictions (the eval CLI's grid and rule); a number = itself."""
    spec = str(spec).strip()
    if spec != "val":
        return float(spec), "config"
    from leader_jax import metrics as M
    from leader_jax.cli import load_config
    from leader_jax.eval import read_predictions

    path = run / "predictions" / "val.npz"
    if not path.is_file():
        raise UserError(f"threshold=val needs {path} (the run's validation predictions); "
                        "pass a number instead, e.g. --config.threshold=0.5")
    val = read_predictions(path)
    step = load_config("eval.py").threshold_step
    return M.best_threshold(val["y_true"], val["y_prob"], M.threshold_grid(step)), f"tuned on {path}"


def is_number(spec: str) -> bool:
    try:
        x = float(spec)
    except (TypeError, ValueError):
        return False
    return math.isfinite(x)
