"""Algorithm registry: an algorithm is an ``update`` function over one epoch's rollout.

``update(policy, optimizer, rollout, advantages, cfg, generator, tracker) -> dict[str, float]``
receives the epoch's :class:`~agents.core.Rollout`, the normalised and clipped advantages ``[B]``,
the run's :class:`~agents.config.TrainConfig`, a seeded ``torch.Generator`` for shuffles, and the
:class:`~agents.core.PerPromptStatTracker`; it applies its optimizer steps and returns metrics named
like ``losses/…``. See the README's recipe for adding one.
"""

from __future__ import annotations

from collections.abc import Callable

from agents import ddpo_is, ddpo_sf, rwr, rwr_sparse

UpdateFn = Callable[..., dict]
_ALGOS: dict[str, UpdateFn] = {}


def register_algo(name: str, update: UpdateFn, *, override: bool = False) -> None:
    if name in _ALGOS and not override:
        raise ValueError(f"algorithm {name!r} is already registered; pass override=True to replace it")
    _ALGOS[name] = update


def get_algo(name: str) -> UpdateFn:
    _load_builtin()
    if name not in _ALGOS:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {registered_algos()}")
    return _ALGOS[name]


def registered_algos() -> list[str]:
    _load_builtin()
    return sorted(_ALGOS)


def _load_builtin() -> None:
    for name, fn in (("ddpo-is", ddpo_is.update), ("ddpo-sf", ddpo_sf.update),
                     ("rwr", rwr.update), ("rwr-sparse", rwr_sparse.update)):  # fmt: skip
        _ALGOS.setdefault(name, fn)


def describe_algo(name: str) -> str:
    """One line about a registered algorithm: the first line of its update function's docstring, else of its
    module's docstring (the built-in algorithms document themselves there)."""
    import sys

    fn = get_algo(name)
    for doc in (fn.__doc__, getattr(sys.modules.get(fn.__module__), "__doc__", None)):
        if doc and doc.strip():
            return doc.strip().splitlines()[0]
    return "(no description: give its update function a docstring)"
