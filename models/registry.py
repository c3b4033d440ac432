"""One registry of named architectures: ``build(name, config)`` and their config dataclasses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "denoiser" | "codec"
    config_cls: type
    factory: Callable[[Any], nn.Module]
    presets: dict[str, dict[str, Any]]


_REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def names(kind: str | None = None) -> list[str]:
    _load_builtin()
    return sorted(n for n, e in _REGISTRY.items() if kind is None or e.kind == kind)


def get(name: str) -> Entry:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(names())}") from None


def make_config(name: str, preset: str | None = None, **overrides: Any) -> Any:
    """Config for ``name``: the dataclass defaults, then a named preset, then overrides."""
    entry = get(name)
    values: dict[str, Any] = {}
    if preset:
        if preset not in entry.presets:
            raise KeyError(f"{name}: unknown preset {preset!r}; known: {sorted(entry.presets)}")
        values.update(entry.presets[preset])
    values.update(overrides)
    return config_from_dict(entry.config_cls, values)


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a frozen config from JSON (lists become tuples where the field is a tuple)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config fields {sorted(unknown)}")
    clean = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**clean)


def build(name: str, config: Any | None = None) -> nn.Module:
    entry = get(name)
    if config is None:
        config = entry.config_cls()
    if not isinstance(config, entry.config_cls):
        raise TypeError(f"{name} wants a {entry.config_cls.__name__}, got {type(config).__name__}")
    return entry.factory(config)


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from models import denoiser

    register(
        Entry(
            name="resunet-denoiser",
            kind="denoiser",
            config_cls=denoiser.DenoiserConfig,
            factory=denoiser.ResUNetDenoiser,
            presets={
                "tiny": {"channels": (8, 16), "blocks": (1, 1)},
                "small": {"channels": (32, 64, 128), "blocks": (1, 1, 2)},
                "base": {"channels": (48, 96, 192), "blocks": (1, 2, 2)},
            },
        )
    )
    from models import embedder

    embedder.register_all(register, Entry)
    try:
        from models import checkerboard, codec, hyperprior, restore
    except ImportError:  # the codec modules are optional until they land
        return
    codec.register_all(register, Entry)
    hyperprior.register_all(register, Entry)
    checkerboard.register_all(register, Entry)
    restore.register_all(register, Entry)
