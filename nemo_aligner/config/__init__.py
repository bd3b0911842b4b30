"""Typed run configs with NeMo-Aligner's key names, and validation of a composed Hydra/OmegaConf
config against them with errors that name the key. Importing this package does not import torch.

    cfg = load_config(raw, DPORunConfig)   # raw: DictConfig / dict from Hydra or YAML

Schemas: `config.sections` (what every recipe shares), `config.dpo`, `config.sft`, `config.rm`, `config.generate`,
`config.grpo`, `config.ppo`;
`config.nemo_compat` lists the NeMo keys that are accepted and ignored.
"""

import dataclasses

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from nemo_aligner.config import resolvers  # noqa: F401  (registers ${multiply:...}, ${demo_asset:...}, ...)
from nemo_aligner.config.dpo import DPORunConfig
from nemo_aligner.config.generate import GenerateRunConfig
from nemo_aligner.config.grpo import GRPORunConfig
from nemo_aligner.config.ppo import PPORunConfig
from nemo_aligner.config.rm import RMRunConfig
from nemo_aligner.config.nemo_compat import loop_sections, strip_nemo_only_keys
from nemo_aligner.config.sft import SFTRunConfig

__all__ = ["ConfigError", "load_config", "DPORunConfig", "GenerateRunConfig", "GRPORunConfig", "PPORunConfig",
           "RMRunConfig", "SFTRunConfig"]


class ConfigError(ValueError):
    """A user's configuration is wrong; the message names the key and what was expected."""


def load_config(raw, schema):
    """raw: DictConfig / dict from Hydra or YAML -> a schema dataclass instance (validated).

    Interpolations resolve after the merge with the schema, so a NeMo config file's `${model.encoder_seq_length}`
    or `${multiply:${model.tensor_model_parallel_size}, ...}` finds the schema's defaults; NeMo's Megatron-only
    keys are dropped first (config.nemo_compat)."""
    if isinstance(raw, DictConfig):  # plain values (a Hydra config is typed by the schema); interpolations kept
        raw = OmegaConf.to_container(raw, resolve=False)
    try:
        raw = strip_nemo_only_keys(OmegaConf.create({k: v for k, v in (raw or {}).items() if k != "hydra"}),
                                   loop_sections(schema))
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
