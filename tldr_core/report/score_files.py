"""The per-image scores of an audit folder, written and read back for the comparison of two versions.

An audit folder holds T's calibrated exposure per attack (``exposure.csv``; a further attack's in
``<kind>/exposure.csv``) and every image's membership scores (``membership.csv``: T and H'). The paired
comparison (tldr_core.scoring.compare) also needs H''s exposure, which exposure.csv leaves out:
:func:`write_heldout_exposure` writes it beside as ``exposure_heldout.csv`` (one row per image of H':
heldout_index, label, exposure, raw_exposure). ``lineage.json`` names the data the audit ran on (data
set, split seed, sizes, digests of T and H'), so two folders can tell whether their images pair up.

:func:`read_version_scores` reads a folder written that way (the re-audit's, or one downloaded from an
audit run's artifacts) back into :class:`VersionScores`.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["HELDOUT_EXPOSURE_CSV", "LINEAGE_JSON", "SCORE_FILES", "VersionScores", "write_heldout_exposure",
           "write_score_files", "read_version_scores"]

HELDOUT_EXPOSURE_CSV = "exposure_heldout.csv"
LINEAGE_JSON = "lineage.json"
#: What the comparison reads from an audit folder (per attack folder: the first two and the third).
SCORE_FILES = ("exposure.csv", HELDOUT_EXPOSURE_CSV, "membership.csv", "metrics.json", LINEAGE_JSON)

Scores = tuple[dict[int, float], dict[int, float]]  # (T: train index -> score, H': held-out index -> score)


def write_heldout_exposure(folder: str | Path, exposure: Any, heldout_labels: Tensor) -> Path:
    """``exposure_heldout.csv`` of one attack's ExposureResult: the calibrated and raw exposure of every
    image of H' (heldout_index: its index in the held-out set; labels: the held-out set's labels)."""
    path = Path(folder) / HELDOUT_EXPOSURE_CSV
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["heldout_index", "label", "exposure", "raw_exposure"])
        for j, i in enumerate(exposure.heldout_index.tolist()):
            w.writerow([i, int(heldout_labels[i]), float(exposure.e_heldout[j]), float(exposure.raw_heldout[j])])
    return path


def write_score_files(folder: str | Path, res: Any, bundle: Any, lineage: dict[str, Any]) -> list[Path]:
    """exposure_heldout.csv of every attack scored for exposure (the first in ``folder``, the others in
    ``folder/<kind>``) and lineage.json; ``res`` is an AuditResults."""
    folder = Path(folder)
    out = []
    for sub, scored in [("", res.attack), *res.others.items()]:
        if scored.exposure is not None:
            out.append(write_heldout_exposure(folder / sub, scored.exposure, bundle.heldout.labels))
    (folder / LINEAGE_JSON).write_text(json.dumps(lineage, indent=1, sort_keys=True))
    return out + [folder / LINEAGE_JSON]


@dataclass
class VersionScores:
    """What one version's audit folder says for a comparison. exposure: attack kind -> (T, H') calibrated
    exposure; membership: membership attack -> (T, H') score; levels: the verdict per axis; lineage:
    lineage.json ({} when absent); missing: files the comparison wanted and did not find."""

    exposure: dict[str, Scores] = field(default_factory=dict)
    membership: dict[str, Scores] = field(default_factory=dict)
    levels: dict[str, str] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _exposure(folder: Path) -> Scores | None:
    t, h = folder / "exposure.csv", folder / HELDOUT_EXPOSURE_CSV
    if not (t.is_file() and h.is_file()):
        return None
    return ({int(r["train_index"]): float(r["exposure"]) for r in _rows(t)},
            {int(r["heldout_index"]): float(r["exposure"]) for r in _rows(h)})


def _membership(path: Path) -> dict[str, Scores]:
    rows = _rows(path)
    attacks = [k[: -len("_score")] for k in (rows[0] if rows else {}) if k.endswith("_score")]
    out: dict[str, Scores] = {}
    for a in attacks:
        out[a] = ({int(r["index"]): float(r[f"{a}_score"]) for r in rows if r["split"] == "train"},
                  {int(r["index"]): float(r[f"{a}_score"]) for r in rows if r["split"] == "heldout"})
    return out


def read_version_scores(folder: str | Path) -> VersionScores:
    """The scores, verdict levels and lineage of an audit folder (files that are not there: ``missing``)."""
    folder = Path(folder)
    vs = VersionScores()
    if (folder / "metrics.json").is_file():
        vs.record = json.loads((folder / "metrics.json").read_text())
        vs.levels = {k: v for k, v in (vs.record.get("verdict") or {}).items() if k != "sentence"}
    else:
        vs.missing.append("metrics.json")
    if (folder / LINEAGE_JSON).is_file():
        vs.lineage = json.loads((folder / LINEAGE_JSON).read_text())
    else:
        vs.missing.append(LINEAGE_JSON)
    kinds = [(vs.record.get("attack", "tldr"), folder)]
    kinds += [(k, folder / v.get("folder", k)) for k, v in (vs.record.get("other_attacks") or {}).items()]
    for kind, where in kinds:
        got = _exposure(where)
        if got is None:
            vs.missing.append(str(Path(where.relative_to(folder)) / HELDOUT_EXPOSURE_CSV))
        else:
            vs.exposure[kind] = got
    if (folder / "membership.csv").is_file():
        vs.membership = _membership(folder / "membership.csv")
    return vs
