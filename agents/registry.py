"""Algorithm registry: an algorithm is an ``update`` function over one epoch's rollout, its own typed config,
its presets, and whether it needs a reference policy.

``update(policy, optimizer, rollout, advantages, cfg, generator, tracker, *, state, ref) -> dict[str, float]``
receives the epoch's :class:`~agents.core.Rollout`, the normalised and clipped advantages ``[B]``, the run's
:class:`~agents.config.TrainConfig` (its own settings in ``cfg.algo_config``), a seeded ``torch.Generator``
for shuffles, and the :class:`~agents.core.PerPromptStatTracker`; it applies its optimizer steps and returns
metrics named like ``losses/…``. The keyword arguments are passed only to an update that declares them:

- ``state``: a dict the algorithm may keep values in across epochs (floats, ints, strings, bools, lists of
  them, and tensors); the trainer saves it in every checkpoint (tensors as safetensors, the rest as JSON,
  atomically with the rest) and restores it exactly on resume. Empty at the start of a run.
- ``ref``: the reference policy (:class:`~agents.policy.ReferencePolicy`: the base weights, frozen) when the
  algorithm registered ``reference="device"`` or ``"offload"`` and its config does not say it needs none
  (a config may define ``needs_reference(self) -> bool``, e.g. GRPO with β = 0); else None.

Register with :func:`register_algo`; the old form ``register_algo(name, update)`` registers an algorithm
without settings of its own (see the README's recipe and ``benchmarks/examples/``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

UpdateFn = Callable[..., dict]
REFERENCE_PLACEMENTS = (False, "device", "offload")
_ALGOS: dict[str, UpdateFn] = {}  # name -> update function (kept as it was for code that reads it)
_SPECS: dict[str, AlgoSpec] = {}


@dataclass(frozen=True)
class AlgoSpec:
    """A registered algorithm."""

    name: str
    update: UpdateFn
    config: type  # a dataclass with documented fields (agents.fields.doc_field)
    presets: dict[str, Any] = field(default_factory=dict)  # preset -> {field: value} or env_id -> {field: value}
    reference: bool | str = False  # False, "device" or "offload"
    extras: frozenset[str] = frozenset()  # the keyword arguments (state, ref) its update declares

    def preset(self, preset: str, env_id: str) -> dict[str, Any]:
        """The preset's field values for ``env_id`` (empty when the algorithm registered none)."""
        values = self.presets.get(preset) or {}
        return dict(values(env_id) if callable(values) else values)

    def needs_reference(self, algo_config: Any) -> bool:
        """Whether a run with ``algo_config`` gets a reference policy."""
        if not self.reference:
            return False
        ask = getattr(algo_config, "needs_reference", None)
        return bool(ask()) if callable(ask) else True


def _extras(update: UpdateFn) -> frozenset[str]:
    try:
        params = inspect.signature(update).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset({"state", "ref"})
    return frozenset(n for n in ("state", "ref") if n in params)


def _check_config(name: str, config: type) -> None:
    from agents.config import TrainConfig

    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise ValueError(f"register_algo({name!r}): config={config!r}; expected a dataclass type")
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(config):
        if f.name in shared:
            raise ValueError(f"register_algo({name!r}): {config.__name__}.{f.name} shadows the shared TrainConfig "
                             f"field {f.name!r}; expected another name")  # fmt: skip
        if not f.metadata.get("help"):
            raise ValueError(f"register_algo({name!r}): {config.__name__}.{f.name} has no help; expected a field "
                             "made with agents.fields.doc_field(default, help)")  # fmt: skip
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"register_algo({name!r}): {config.__name__}.{f.name} has no default; expected one")


def register_algo(name: str, update: UpdateFn, config: type | None = None, presets: dict[str, Any] | None = None,
                  reference: bool | str = False, *, override: bool = False) -> None:  # fmt: skip
    """Register ``update`` under ``name``.

    Args:
        config: the dataclass of the algorithm's own settings (fields made with
            :func:`agents.fields.doc_field`; optionally ``validate(self, shared) -> list[str]`` and
            ``needs_reference(self) -> bool``). None: no settings of its own (the epoch is cut into optimizer
            steps of ``train_batch_size`` samples, which must divide ``samples_per_epoch``).
        presets: ``{"tiny": {...}, "sd14": {...}, "sd35": {...}}``: field values (shared or the algorithm's) of
            :func:`agents.config.preset_config`; a value may also be a function of the env ID returning them.
        reference: False, or where a frozen copy of the base weights is kept under full fine-tuning,
            ``"device"`` or ``"offload"`` (the CPU, moved to the device for each call); with LoRA the
            reference is the policy's own network with its adapters switched off, no copy.
        override: replace an algorithm registered under ``name``.
    """
    from agents.config import PRESETS, TrainConfig
    from agents.fields import StepBatchesConfig

    if name in _ALGOS and not override:
        raise ValueError(f"algorithm {name!r} is already registered; pass override=True to replace it")
    config = StepBatchesConfig if config is None else config
    _check_config(name, config)
    if reference not in REFERENCE_PLACEMENTS:
        raise ValueError(f"register_algo({name!r}): reference={reference!r}; expected False, 'device' or 'offload'")
    unknown = sorted(set(presets or {}) - set(PRESETS))
    if unknown:
        raise ValueError(f"register_algo({name!r}): unknown presets {unknown}; expected some of {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(config)}
    for preset, values in (presets or {}).items():
        bad = sorted(set(values) - known) if isinstance(values, dict) else []
        if bad:
            raise ValueError(f"register_algo({name!r}): preset {preset!r} sets {bad}, fields of neither TrainConfig "
                             f"nor {config.__name__}; expected some of {sorted(known)}")  # fmt: skip
    _SPECS[name] = AlgoSpec(name, update, config, dict(presets or {}), reference, _extras(update))
    _ALGOS[name] = update


def find_algo(name: str) -> AlgoSpec | None:
    """The registered algorithm ``name``, or None."""
    _load_builtin()
    if name not in _ALGOS:
        return None
    spec = _SPECS.get(name)
    if spec is None or spec.update is not _ALGOS[name]:  # put into _ALGOS directly: no settings of its own
        register_algo(name, _ALGOS[name], override=True)
        spec = _SPECS[name]
    return spec


def algo_spec(name: str) -> AlgoSpec:
    spec = find_algo(name)
    if spec is None:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {registered_algos()}")
    return spec


def get_algo(name: str) -> UpdateFn:
    return algo_spec(name).update


def registered_algos() -> list[str]:
    _load_builtin()
    return sorted(_ALGOS)


_LOADED = False


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from agents import ddpo_is, ddpo_sf, grpo, nft, rwr, rwr_sparse

    builtin = (("ddpo-is", ddpo_is.update, ddpo_is.DDPOISConfig, ddpo_is.PRESETS, False),
               ("ddpo-sf", ddpo_sf.update, ddpo_sf.DDPOSFConfig, ddpo_sf.PRESETS, False),
               ("grpo", grpo.update, grpo.GRPOConfig, grpo.PRESETS, "device"),
               ("nft", nft.update, nft.NFTConfig, nft.PRESETS, False),
               ("rwr", rwr.update, rwr.RWRConfig, rwr.PRESETS, False),
               ("rwr-sparse", rwr_sparse.update, rwr_sparse.RWRSparseConfig, rwr_sparse.PRESETS, False))  # fmt: skip
    for name, update, config, presets, reference in builtin:
        if name not in _ALGOS:
            register_algo(name, update, config=config, presets=presets, reference=reference)


def describe_algo(name: str) -> str:
    """One line about a registered algorithm: the first line of its update function's docstring, else of its
    module's docstring (the built-in algorithms document themselves there)."""
    import sys

    fn = get_algo(name)
    for doc in (fn.__doc__, getattr(sys.modules.get(fn.__module__), "__doc__", None)):
        if doc and doc.strip():
            return doc.strip().splitlines()[0]
    return "(no description: give its update function a docstring)"
