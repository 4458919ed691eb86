"""Drug mappings for MIMIC: NDC → RxCUI → ATC-4 → ATC-3 (first 4 characters), as in GAMENet/LEADER,
plus WHO ATC-3 display names and the legacy ATC-3 DDI graph (TWOSIDES, TOPK=40 least-frequent
selection, as the original). The NDC map is a Python dict literal read with `ast.literal_eval`."""
from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Dict, List, Tuple

import pandas as pd

from leader_jax.data.tables import read_table


@functools.lru_cache(maxsize=4)
def load_ndc_to_rxcui(path: str) -> Dict[str, str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"NDC→RxCUI map {p} does not exist")
    try:
        obj = ast.literal_eval(p.read_text(encoding="utf-8"))
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"{p}: not a Python dict literal ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{p}: expected a dict literal NDC -> RxCUI, got {type(obj).__name__}")
    # a few NDCs map to an empty RxCUI: treat them as unmapped
    return {str(k).strip(): str(v).strip() for k, v in obj.items() if str(v).strip()}


@functools.lru_cache(maxsize=4)
def load_rxcui_to_atc3(path: str) -> Dict[str, str]:
    """RxCUI -> ATC-3 (ATC4 cut to 4 characters); the FIRST row per RxCUI wins, as in the original."""
    df = read_table(Path(path), ["rxcui", "atc4"])
    df = df.dropna().drop_duplicates(subset=["rxcui"], keep="first")
    return dict(zip(df["rxcui"].tolist(), df["atc4"].str[:4].tolist()))


@functools.lru_cache(maxsize=4)
def load_ddi_pairs(path: str) -> Tuple[Tuple[str, ...], Tuple[Tuple[str, str], ...]]:
    """(sorted ATC-3 codes covered by the graph, interacting pairs)."""
    df = read_table(Path(path), ["atc3_a", "atc3_b"]).dropna()
    pairs = tuple(zip(df["atc3_a"].tolist(), df["atc3_b"].tolist()))
    codes = tuple(sorted(set(df["atc3_a"]) | set(df["atc3_b"])))
    return codes, pairs


@functools.lru_cache(maxsize=4)
def load_atc3_names(path: str) -> Dict[str, str]:
    """ATC-3 code -> lower-cased WHO name (rows whose code has 4 characters)."""
    df = read_table(Path(path), ["atc_code", "atc_name"]).dropna()
    df = df[df["atc_code"].str.len() == 4].drop_duplicates(subset=["atc_code"], keep="first")
    return dict(zip(df["atc_code"].tolist(), df["atc_name"].str.lower().tolist()))


def ndc_to_atc3(ndc_path: str, rxcui_path: str) -> Tuple[Dict[str, str], Dict[str, str]]:
    return load_ndc_to_rxcui(str(ndc_path)), load_rxcui_to_atc3(str(rxcui_path))


def map_ndc_series(ndc: pd.Series, ndc2rx: Dict[str, str], rx2atc3: Dict[str, str]) -> Tuple[pd.Series, pd.Series]:
    """Vectorised NDC -> (RxCUI or NaN, ATC-3 or NaN)."""
    rx = ndc.map(ndc2rx)
    return rx, rx.map(rx2atc3)


def ddi_matrix(med_tokens: List[str], pairs, prefix: str = "atc:"):
    """Symmetric uint8 [n_med, n_med] adjacency over the med vocabulary, zero diagonal."""
    import numpy as np

    idx = {t: i for i, t in enumerate(med_tokens)}
    a = np.zeros((len(med_tokens), len(med_tokens)), dtype=np.uint8)
    for x, y in pairs:
        i, j = idx.get(prefix + x), idx.get(prefix + y)
        if i is not None and j is not None and i != j:
            a[i, j] = a[j, i] = 1
    return a
