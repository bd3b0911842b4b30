"""The bundled demos' preset: where their toy values live and the one rule for when they apply.

The typed schema holds real-model defaults (NeMo-Aligner's gpt_dpo.yaml / gpt_sft.yaml values). A demo
(a tiny model trained from scratch on toy data, at a high learning rate, for several epochs) needs other
values; they live in `nemo_aligner/conf/demo/<recipe>.yaml` and are applied only to a run that names
no checkpoint and no data (`pretrained_checkpoint.restore_from_path` and `model.data.data_prefix` both
unset), i.e. exactly the script run with no arguments (or with overrides of other keys), or when asked for
on the command line with `+demo=gpt_dpo` (the presets are a Hydra config group at the root package, e.g.
to DPO the SFT demo's export). They never reach a run on a real checkpoint or real data unasked.
Command-line overrides still win over the preset.

    if is_demo_run(raw):
        raw = with_preset(raw, demo_yaml, overrides)   # overrides: the command line's key=value strings

Nothing here imports torch.
"""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict


def is_demo_run(raw) -> bool:
    """True when the composed config names no checkpoint and no data."""
    raw = raw if isinstance(raw, DictConfig) else OmegaConf.create(raw or {})
    restore = OmegaConf.select(raw, "pretrained_checkpoint.restore_from_path", default=None)
    data = OmegaConf.select(raw, "model.data.data_prefix", default=None)
    if isinstance(data, DictConfig):
        data = any(data.get(split) for split in data)
    return restore in (None, "") and not data


def load_preset(path) -> DictConfig:
    """A preset YAML without its Hydra parts (defaults list, hydra settings)."""
    preset = OmegaConf.load(Path(path))
    with open_dict(preset):
        for key in ("defaults", "hydra"):
            preset.pop(key, None)
    return preset


def with_preset(raw, preset_path, overrides=()) -> DictConfig:
    """`raw` with the preset merged over it (none when preset_path is None), then `overrides` (Hydra
    command-line strings such as `++model.micro_batch_size=1`) applied again, so what the user typed still
    wins over the preset."""
    raw = raw if isinstance(raw, DictConfig) else OmegaConf.create(raw or {})
    merged = OmegaConf.merge(raw, load_preset(preset_path)) if preset_path is not None else raw.copy()
    apply_overrides(merged, overrides)
    return merged


def apply_overrides(cfg: DictConfig, overrides) -> None:
    """Hydra's override grammar, applied as Hydra applies it (`key=v`, `+key=v`, `++key=v`, `~key`)."""
    overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    if not overrides:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if override.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is not None and leaf in node:
                with open_dict(node):
                    del node[leaf]
            continue
        with open_dict(cfg):
            OmegaConf.update(cfg, key, override.value(), merge=True, force_add=True)
