"""``compare``: which differences between distilled models are real, from their per-point results.

Each argument is a run directory, a seed sweep directory (``distill --seeds``), a results file
``results/<id>.json`` or a points file ``results/<id>.points.safetensors``; a run stands for the student it
reports under its own name, a sweep for all its seeds. The statistics live in
:mod:`robustbench_kd.analysis.comparison`; this module finds the files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from robustbench_kd.analysis.comparison.render import Comparison, build_comparison, write_comparison
from robustbench_kd.analysis.comparison.verdicts import ComparedModel
from robustbench_kd.analysis.reports.staging import output_dir
from robustbench_kd.api.sweep import MANIFEST_FORMAT, MANIFEST_LIMIT, MANIFEST_NAME
from robustbench_kd.config import load_file
from robustbench_kd.errors import UserError
from robustbench_kd.evaluation.points import POINTS_SUFFIX, points_path, read_points
from robustbench_kd.storage.bounded import load_json_bounded

__all__ = ["compare", "compared_model"]

SWEEP_MANIFEST, SWEEP_FORMAT = MANIFEST_NAME, MANIFEST_FORMAT


def compare(
    sources: Sequence[str | os.PathLike[str]],
    *,
    metric: str = "autoattack",
    out: str | os.PathLike[str] | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> Comparison:
    """Compare the models of ``sources`` on their per-point outcomes.

    Returns the :class:`~robustbench_kd.analysis.comparison.render.Comparison` (``.markdown()`` is the
    table and the verdicts); with ``out`` also writes ``comparison.md``, ``.html``, ``.png`` and ``.json``
    there. ``metric`` is the outcome the pairs are tested on (``autoattack``, ``clean``, ``pgd-20``, ...).
    Models evaluated on other points, with another eps or other attack settings are refused in one line.
    """
    out_path = output_dir(out, what="--out") if out is not None else None
    models = [compared_model(source) for source in sources]
    comparison = build_comparison(models, key=metric, n_resamples=n_resamples, seed=seed)
    if out_path is not None:
        write_comparison(comparison, out_path)
    return comparison


def compared_model(source: str | os.PathLike[str]) -> ComparedModel:
    """The model (one run, or every seed of a sweep) that ``source`` names, with its per-point files."""
    path = Path(source)
    if path.is_dir() and (path / SWEEP_MANIFEST).is_file():
        return _sweep(path)
    if path.is_dir() and (path / "config.yaml").is_file():
        name = _run_name(path)
        return _single(points_path(path / "results", name), label=name, source=path)
    # Any file kind (a FIFO, a device) goes to the bounded reader, which names what is wrong with it.
    present = path.exists() and not path.is_dir()
    if present and path.name.endswith(POINTS_SUFFIX):
        return _single(path, label=None, source=path)
    if present and path.suffix == ".json":
        return _single(path.with_name(path.stem + POINTS_SUFFIX), label=None, source=path)
    raise UserError(
        f"{path} is not a run directory, a sweep directory (with {SWEEP_MANIFEST}), results/<id>.json or "
        f"results/<id>{POINTS_SUFFIX}"
    )


def _single(points: Path, *, label: str | None, source: Path) -> ComparedModel:
    if not points.exists():
        raise UserError(
            f"{source} has no per-point results ({points} is missing); evaluate it again with this version "
            "(`robustbench-kd evaluate MODEL --name ID`, or the run's final evaluation)"
        )
    result = read_points(points)
    return ComparedModel(label or result.model_id, [result], [None], str(source))


def _run_name(run_dir: Path) -> str:
    run = load_file(run_dir / "config.yaml").get("run")
    name = run.get("name") if isinstance(run, dict) else None
    if not isinstance(name, str):
        raise UserError(f"{run_dir / 'config.yaml'} has no run.name; it is not the config.yaml of a distill run")
    return name


def _sweep(sweep_dir: Path) -> ComparedModel:
    manifest = load_json_bounded(sweep_dir / SWEEP_MANIFEST, limit=MANIFEST_LIMIT, what="sweep manifest")
    runs = manifest.get("runs") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != SWEEP_FORMAT or not isinstance(runs, list):
        raise UserError(f"{sweep_dir / SWEEP_MANIFEST} is not the manifest of a `distill --seeds` sweep")
    files, seeds = [], []
    for run in runs:
        seed, run_dir, model_id = (
            run.get(k) if isinstance(run, dict) else None for k in ("seed", "run_dir", "model_id")
        )
        if not isinstance(seed, int) or not isinstance(run_dir, str) or not isinstance(model_id, str):
            raise UserError(f"{sweep_dir / SWEEP_MANIFEST} has a damaged run entry {str(run)[:60]}")
        directory = _inside(sweep_dir, run_dir)
        points = points_path(directory / "results", model_id)
        if not points.is_file():
            raise UserError(
                f"seed {seed} of the sweep {sweep_dir} has no per-point results ({points}); finish it with the "
                "same `robustbench-kd distill CONFIG --seeds ...` command"
            )
        files.append(read_points(points))
        seeds.append(seed)
    if not files:
        raise UserError(f"the sweep {sweep_dir} lists no seeds")
    label = manifest.get("name") if isinstance(manifest.get("name"), str) else sweep_dir.name
    return ComparedModel(str(label), files, list(seeds), str(sweep_dir))


def _inside(root: Path, relative: str) -> Path:
    """``root / relative``, refused when the manifest points outside the sweep directory."""
    candidate = (root / relative).resolve()
    if root.resolve() not in candidate.parents:
        raise UserError(f"{root / SWEEP_MANIFEST} names the run directory {relative[:60]!r}, outside the sweep")
    return candidate
