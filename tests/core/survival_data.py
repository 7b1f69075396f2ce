"""Shipped survival data sets encoded for the Cox and concordance reference tests."""

from __future__ import annotations

import pandas as pd
from lifelines.datasets import load_gbsg2


def gbsg2_frame() -> pd.DataFrame:
    """lifelines' GBSG2 (German Breast Cancer Study Group 2) with categoricals encoded numerically, all float."""
    g = load_gbsg2()
    return pd.DataFrame(
        {
            "horTh": (g.horTh == "yes").astype(float),
            "age": g.age,
            "post": (g.menostat == "Post").astype(float),
            "tsize": g.tsize,
            "tgrade": g.tgrade.map({"I": 1.0, "II": 2.0, "III": 3.0}).astype(float),
            "pnodes": g.pnodes,
            "progrec": g.progrec,
            "estrec": g.estrec,
            "time": g.time,
            "cens": g.cens,
        }
    ).astype(float)
