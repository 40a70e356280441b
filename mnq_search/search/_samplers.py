"""Optuna samplers and pruners by name (registries: a new one is one decorated factory).

Samplers (all seeded): ``tpe`` (multivariate TPE, the default), ``gp`` (Gaussian process),
``nsga2`` (genetic; suits two-objective studies), ``random``. Pruners: ``median``, ``halving``
(successive halving), ``none``; only objectives that report intermediate values (``qat``) in a
one-objective study are pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import unknown_choice
from ._storage import quiet_experimental

_SAMPLERS: dict[str, Callable[[int | None], Any]] = {}
_PRUNERS: dict[str, Callable[[], Any]] = {}


def register_sampler(name: str):
    """Decorator registering ``factory(seed) -> optuna sampler`` under ``name``."""
    def add(factory):
        if name in _SAMPLERS:
            raise ValueError(f"sampler {name!r} registered twice")
        _SAMPLERS[name] = factory
        return factory
    return add


def register_pruner(name: str):
    """Decorator registering ``factory() -> optuna pruner`` under ``name``."""
    def add(factory):
        if name in _PRUNERS:
            raise ValueError(f"pruner {name!r} registered twice")
        _PRUNERS[name] = factory
        return factory
    return add


def list_samplers() -> tuple[str, ...]:
    return tuple(_SAMPLERS)


def list_pruners() -> tuple[str, ...]:
    return tuple(_PRUNERS)


def make_sampler(name: str, seed: int | None):
    """A seeded Optuna sampler by name."""
    if name not in _SAMPLERS:
        raise unknown_choice("sampler", name, _SAMPLERS)
    with quiet_experimental():
        return _SAMPLERS[name](seed)


def make_pruner(name: str):
    """An Optuna pruner by name."""
    if name not in _PRUNERS:
        raise unknown_choice("pruner", name, _PRUNERS)
    return _PRUNERS[name]()


@register_sampler("tpe")
def _tpe(seed):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, multivariate=True)  # the slots jointly, not one by one


@register_sampler("gp")
def _gp(seed):
    import optuna

    return optuna.samplers.GPSampler(seed=seed)


@register_sampler("nsga2")
def _nsga2(seed):
    import optuna

    return optuna.samplers.NSGAIISampler(seed=seed)


@register_sampler("random")
def _random(seed):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


@register_pruner("median")
def _median():
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=5)


@register_pruner("halving")
def _halving():
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner()


@register_pruner("none")
def _none():
    import optuna

    return optuna.pruners.NopPruner()
