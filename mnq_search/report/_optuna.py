"""Optuna studies (joint search over slots): optimization history, parameter importance per slot
(the study's parameters are named after slots) and, with two or three objectives, the Pareto front.
Drawn by Optuna's own ``optuna.visualization.matplotlib`` functions on the study loaded from a
SQLite export (``sqlite:///study.db``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ._html import Plot
from ._style import save_png, slug

PLOT_ERRORS = (ValueError, RuntimeError, ZeroDivisionError)  # what Optuna raises for a study it cannot plot


@contextmanager
def _agg_pyplot() -> Iterator[object]:
    """Optuna draws through ``pyplot`` and sets its ggplot style globally: use the headless Agg
    backend and a private copy of the style settings meanwhile, close what was drawn, and give the
    previous backend and settings back."""
    import matplotlib
    import matplotlib.pyplot as plt

    before = plt.get_backend()
    if before.lower() != "agg":
        plt.switch_backend("agg")
    open_before = set(plt.get_fignums())
    try:
        with matplotlib.rc_context():
            yield plt
    finally:
        for num in set(plt.get_fignums()) - open_before:
            plt.close(num)
        if before.lower() != "agg":
            try:
                plt.switch_backend(before)
            except ImportError:  # an interactive backend that cannot start here: stay on Agg
                pass


def optuna_plots(db: Path, label: str, out: Path, notes: list[str]) -> list[Plot]:
    """Every plot of every study in the SQLite storage ``db``; problems go to ``notes``.

    Args:
        db: the SQLite file.
        label: its path relative to the report's folder (for captions and file names).
        out: the report folder.
        notes: list to append skip reasons to.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:  # skip_table_creation: a database that is not Optuna's is read, never given Optuna's tables
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}", skip_table_creation=True)
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # SQLAlchemy and Optuna raise many types for a foreign or outdated database
        notes.append(f"{label}: not a readable Optuna storage ({type(exc).__name__}: "
                     f"{str(exc).splitlines()[0][:120]})")
        return []
    if not names:
        notes.append(f"{label}: holds no Optuna study")
    plots: list[Plot] = []
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        plots += _study_plots(study, f"{label} · {name}", out, slug("optuna", Path(label).stem, name), notes)
    return plots


@dataclass
class _Job:
    """One Optuna plot to draw: its file stem, heading, drawing function and size in inches."""

    stem: str
    what: str
    draw: Callable[[], object]
    size: tuple[float, float]


def _study_plots(study, title: str, out: Path, stem: str, notes: list[str]) -> list[Plot]:
    from optuna.trial import TrialState

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        notes.append(f"{title}: no completed trial, nothing to plot")
        return []
    if len(study.directions) not in (2, 3):
        notes.append(f"{title}: single objective, no Pareto front")
    n_params = len({p for t in complete for p in t.params})
    caption = f"{len(complete)} completed trials, {n_params} parameters"
    return _draw(_jobs(study, stem, n_params), title, caption, out, notes)


def _jobs(study, stem: str, n_params: int) -> list[_Job]:
    """History and slot importance per objective; the Pareto front for two or three objectives."""
    from optuna.visualization import matplotlib as ovm

    n_obj = len(study.directions)
    names = study.metric_names or (["objective"] if n_obj == 1 else [f"objective {i}" for i in range(n_obj)])
    suffix = (lambda i: f"_{i}") if n_obj > 1 else (lambda i: "")
    jobs = [_Job(f"{stem}_history{suffix(i)}", f"Optimization history: {names[i]}",
                 _history(study, i, names[i]), (8, 4.5)) for i in range(n_obj)]
    jobs += [_Job(f"{stem}_importance{suffix(i)}", f"Slot importance: {names[i]}",
                  _importance(study, i, names[i]), (8, max(4.0, 1.2 + 0.22 * n_params))) for i in range(n_obj)]
    if n_obj in (2, 3):
        jobs.append(_Job(f"{stem}_pareto", "Pareto front", lambda: ovm.plot_pareto_front(study, target_names=names),
                         (7, 5.5)))
    return jobs


def _draw(jobs: list[_Job], title: str, caption: str, out: Path, notes: list[str]) -> list[Plot]:
    from optuna.exceptions import ExperimentalWarning

    plots = []
    with _agg_pyplot(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", message=".*importances of params to achieve low")  # see _importance
        for job in jobs:
            try:
                fig = job.draw().figure
            except PLOT_ERRORS as exc:
                notes.append(f"{title}: no {job.what.lower()} ({exc})")
                continue
            fig.set_size_inches(*job.size)
            fig.tight_layout()
            plots.append(Plot(save_png(fig, out / f"{job.stem}.png"), f"{job.what} — {title}", caption))
    return plots


def _history(study, i: int, name: str) -> Callable[[], object]:
    from optuna.visualization import matplotlib as ovm

    if len(study.directions) == 1:
        return lambda: ovm.plot_optimization_history(study, target_name=name)
    return lambda: ovm.plot_optimization_history(study, target=lambda t: t.values[i], target_name=name)


def _importance(study, i: int, name: str) -> Callable[[], object]:
    """Optuna's default evaluator (PED-ANOVA) rates parameters for reaching *low* values of a
    ``target``; a maximized objective is negated so that importance means "for a good value"."""
    from optuna.visualization import matplotlib as ovm

    if len(study.directions) == 1:
        return lambda: ovm.plot_param_importances(study, target_name=name)
    sign = -1.0 if study.directions[i].name == "MAXIMIZE" else 1.0
    return lambda: ovm.plot_param_importances(study, target=lambda t: sign * t.values[i], target_name=name)
