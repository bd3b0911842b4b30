"""Validate a composed Hydra/OmegaConf config against the typed schema, with errors that name the key."""

import dataclasses

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from nemo_aligner.config.schema import DPORunConfig, ModelConfig
from nemo_aligner.models.gpt import GPTConfig

__all__ = ["ConfigError", "load_config", "gpt_config_from_model", "DPORunConfig"]


class ConfigError(ValueError):
    """A user's configuration is wrong; the message names the key and what was expected."""


def load_config(raw, schema=DPORunConfig):
    """raw: DictConfig / dict from Hydra or YAML -> a schema dataclass instance (validated)."""
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    raw = {k: v for k, v in (raw or {}).items() if k != "hydra"}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        key = err.full_key
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        valid = _valid_keys(schema, parent)
        raise ConfigError(f"unknown config key '{key}'; valid keys under '{parent or '<root>'}': {valid}") from None
    except ValidationError as err:
        raise ConfigError(f"config key '{err.full_key}': {err.msg}") from None
    except OmegaConfBaseException as err:  # pragma: no cover - other structural problems
        raise ConfigError(f"config key '{getattr(err, 'full_key', '?')}': {err}") from None
    except ValueError as err:  # from a schema __post_init__ check
        raise ConfigError(str(err)) from None


def _valid_keys(schema, dotted: str) -> list[str]:
    cls = schema
    for part in filter(None, dotted.split(".")):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return []
        default = fields[part].default_factory() if fields[part].default_factory is not dataclasses.MISSING else None
        if not dataclasses.is_dataclass(default):
            return []
        cls = type(default)
    return sorted(f.name for f in dataclasses.fields(cls))


def gpt_config_from_model(model: ModelConfig, vocab_size: int) -> GPTConfig:
    """The architecture part of `model.*`, for runs that build a model from scratch."""
    arch = {f.name: getattr(model, f.name) for f in dataclasses.fields(GPTConfig) if hasattr(model, f.name)}
    arch["vocab_size"] = model.vocab_size or vocab_size
    arch["activations_checkpointing"] = model.activations_checkpoint_granularity is not None
    return GPTConfig(**arch)
