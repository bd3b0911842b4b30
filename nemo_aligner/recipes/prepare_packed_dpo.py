"""Offline packing of DPO data with NeMo-Aligner's command line (prepare_packed_dpo_dataset.py).

The config is gpt_dpo.yaml (or --config-path/--config-name) with Hydra-style overrides, so the
data options are the training run's own: model.data.* (data_prefix, seq_length, overlength,
chat_template, keys, default rewards), model.encoder_seq_length, model.seed. Script keys sit at the
root and are written with `+` as in NeMo (with or without it is accepted):
  +tokenizer_path     HF folder / tokenizer.json or sentencepiece .model (default: model.tokenizer.path,
                      else the checkpoint's, else the demo tokenizer)
  +tokenizer_type     auto | huggingface | sentencepiece
  +output_dir         where the files go (required)
  +pack_sizes         [4096, 8192]: one file per pack size and split (required); each >= 2 x seq_length
  +packing_algorithm  first_fit_shuffle (NeMo's default) | first_fit_decreasing | best_fit_decreasing
  +seed               alias of model.seed (first_fit_shuffle's order; also in the file name)
Output: <output_dir>/packed_{pack_size}_seed{seed}.{split}.safetensors (format in data/preference/packed_file.py).
`model.data.data_prefix` may be one file or a list (packed as the train split) or NeMo's mapping
{train: [...], validation: [...], test: [...]} (each split given is packed).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from nemo_aligner.config import ConfigError, DPORunConfig, load_config
from nemo_aligner.data.layout import pack_examples, pack_summary
from nemo_aligner.data.packing import ALGORITHMS
from nemo_aligner.data.preference.dataset import PreferenceDataset, options_from_config
from nemo_aligner.data.preference.packed_file import check_pack_size, packed_file_name, write_packed_file
from nemo_aligner.data.rows import split_files
from nemo_aligner.recipes.skeleton import load_tokenizer, user_errors_exit

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "gpt_dpo.yaml"
SPLITS = ("train", "validation", "test")
TOKENIZER_TYPES = ("auto", "huggingface", "sentencepiece")


@dataclass
class PackingArgs:
    """The script's own keys (NeMo passes them as `+key=value`)."""

    output_dir: str | None = None
    pack_sizes: list = field(default_factory=list)
    packing_algorithm: str = "first_fit_shuffle"
    tokenizer_path: str | None = None
    tokenizer_type: str = "auto"
    seed: int | None = None

    def check(self, seq_length: int):
        if not self.output_dir:
            raise ConfigError("+output_dir=... is required (the folder for the packed files)")
        sizes = self.pack_sizes if isinstance(self.pack_sizes, (list, tuple)) else [self.pack_sizes]
        if not sizes:
            raise ConfigError("+pack_sizes=[...] is required, e.g. +pack_sizes=[4096,8192]")
        for size in sizes:
            try:
                check_pack_size(size, seq_length, key="+pack_sizes")
            except ValueError as err:
                raise ConfigError(str(err)) from None
        self.pack_sizes = list(sizes)
        if self.packing_algorithm not in ALGORITHMS:
            raise ConfigError(f"+packing_algorithm={self.packing_algorithm!r}; expected one of {list(ALGORITHMS)}")
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ConfigError(f"+tokenizer_type={self.tokenizer_type!r}; expected one of {list(TOKENIZER_TYPES)}")


def parse_args(argv: list[str]) -> tuple[DPORunConfig, PackingArgs]:
    """Hydra-style overrides over gpt_dpo.yaml -> (validated run config, the script's keys)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    config_file, overrides = _config_file(argv)
    base = OmegaConf.to_container(OmegaConf.load(config_file))
    base = OmegaConf.create({k: v for k, v in base.items() if k not in ("defaults", "hydra")})
    args = {}
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # hydra's OverrideParseException; message says what is wrong
        raise ConfigError(f"cannot parse overrides: {err}") from None
    for override in parsed:
        key, value = override.key_or_group, override.value()
        if override.is_delete():
            raise ConfigError(f"~{key}: deleting keys is not supported here")
        if key in PackingArgs.__dataclass_fields__:
            args[key] = value
        else:  # a value replaces the node, so data_prefix=x.jsonl drops the yaml's train/validation files
            OmegaConf.update(base, key, value, merge=False, force_add=True)
    args = PackingArgs(**args)
    if args.seed is not None:
        OmegaConf.update(base, "model.seed", args.seed, merge=False)
    if args.tokenizer_path is not None:
        OmegaConf.update(base, "model.tokenizer.path", args.tokenizer_path, merge=False)
    OmegaConf.update(base, "model.tokenizer.type", args.tokenizer_type, merge=False)
    cfg = load_config(base, DPORunConfig)
    args.seed = cfg.model.seed
    args.check(cfg.model.seq_length)
    return cfg, args


def _config_file(argv: list[str]) -> tuple[Path, list[str]]:
    """--config-path / --config-name (Hydra's flags, also -cp / -cn), the rest are overrides."""
    path, name, rest = None, None, []
    it = iter(argv)
    for arg in it:
        flag, eq, value = arg.partition("=")
        if flag in ("--config-path", "-cp", "--config-name", "-cn"):
            value = value if eq else next(it, None)
            if value is None:
                raise ConfigError(f"{flag} needs a value")
            if flag in ("--config-path", "-cp"):
                path = value
            else:
                name = value
        else:
            rest.append(arg)
    if path is None and name is None:
        return DEFAULT_CONFIG, rest
    folder = Path(path) if path is not None else DEFAULT_CONFIG.parent
    file = folder / (name if name and name.endswith(".yaml") else f"{name or 'gpt_dpo'}.yaml")
    if not file.is_file():
        raise ConfigError(f"config file {file} not found (--config-path / --config-name)")
    return file, rest


def files_by_split(data_prefix, seed: int | None = None) -> dict[str, list[str]]:
    """model.data.data_prefix as a file, a list of files, or {train: [...], validation: [...], test: [...]}; a
    weighted list is blended with `seed` (model.seed) before packing."""
    if isinstance(data_prefix, str):
        return {"train": [data_prefix]}
    if isinstance(data_prefix, (list, tuple)):
        return {"train": split_files({"train": list(data_prefix)}, "train", seed)}
    if isinstance(data_prefix, dict):
        unknown = sorted(set(data_prefix) - set(SPLITS))
        if unknown:
            raise ConfigError(f"model.data.data_prefix has unknown splits {unknown}; expected {list(SPLITS)}")
        splits = {split: split_files(data_prefix, split, seed) for split in SPLITS}
        return {split: files for split, files in splits.items() if files}
    raise ConfigError(f"model.data.data_prefix={data_prefix!r}; expected a file, a list of files or "
                      "{train: [...], validation: [...]}")


def prepare_packed_dpo(cfg: DPORunConfig, args: PackingArgs, out=print) -> dict:
    """Tokenise each split once, pack it at every pack size, write the files; returns the stats per file."""
    splits = files_by_split(cfg.model.data.data_prefix, cfg.model.seed)
    if not splits:
        raise ConfigError("model.data.data_prefix lists no files")
    tokenizer = load_tokenizer(cfg.model, cfg.pretrained_checkpoint.restore_from_path)
    settings, columns, rewards = options_from_config(cfg.model)
    seq_length, output_dir = cfg.model.seq_length, Path(args.output_dir)
    out(f"tokenizer {tokenizer.name_or_path} (fingerprint {tokenizer.fingerprint()[:16]}), seq_length {seq_length}, "
        f"{args.packing_algorithm}, seed {args.seed}")
    results = {}
    for split, files in splits.items():
        dataset = PreferenceDataset.from_files(files, tokenizer, settings, columns, rewards,
                                               name=f"model.data.data_prefix.{split}")
        out(dataset.report.summary(split))
        if dataset.report.num_truncated:
            out(f"  note: {dataset.report.num_truncated} pairs were cut to seq_length={seq_length} "
                "(model.data.seq_length, else model.encoder_seq_length); set it to the model's sequence length "
                "if that is not intended, or model.data.overlength=drop|error")
        for pack_size in args.pack_sizes:
            packs = pack_examples(dataset, pack_size, args.packing_algorithm, args.seed, name=split)
            path = output_dir / packed_file_name(pack_size, args.seed, split)
            stats = pack_summary(dataset, packs, pack_size)
            write_packed_file(path, dataset, packs, pack_size=pack_size, algorithm=args.packing_algorithm,
                              seed=args.seed, seq_length=seq_length, tokenizer_fingerprint=tokenizer.fingerprint(),
                              extra={"split": split, "efficiency": stats["efficiency"],
                                     "tokenize": settings.key(), "keys": dict(columns.__dict__)})
            stats |= {"path": str(path), "num_truncated": dataset.report.num_truncated,
                      "num_dropped": dataset.report.num_dropped}
            stats["global_batch_size"], stats["micro_batch_size"] = suggested_batch_sizes(
                cfg.model.global_batch_size, cfg.model.micro_batch_size, stats["avg_examples_per_pack"])
            results.setdefault(split, {})[pack_size] = stats
            out(_report(split, pack_size, stats, cfg.model.global_batch_size, cfg.model.micro_batch_size))
    out(_next_steps(results))
    return results


def suggested_batch_sizes(global_pairs: int, micro_pairs: int, avg_pairs_per_pack: float) -> tuple[int, int]:
    """(global, micro) batch sizes in packs that keep about the same pairs per step and per micro-batch.

    NeMo's advice is to divide global_batch_size by the average pairs per pack; the global batch is
    then rounded to a multiple of the micro-batch (data-parallel size 1).
    """
    micro = max(1, round(micro_pairs / avg_pairs_per_pack))
    return max(1, round(global_pairs / avg_pairs_per_pack / micro)) * micro, micro


def _report(split, pack_size, s, global_pairs, micro_pairs) -> str:
    return (f"[{split}] pack_size {pack_size}: {s['num_packs']} packs (lower bound {s['min_packs']}), "
            f"{s['num_examples']} pairs, {s['avg_examples_per_pack']:.2f} pairs per pack, packing efficiency "
            f"{100 * s['efficiency']:.1f}% (real tokens / (packs x pack_size)); truncated {s['num_truncated']}, "
            f"dropped {s['num_dropped']}\n"
            f"  batch sizes: {global_pairs} pairs per step and {micro_pairs} per micro-batch unpacked / "
            f"{s['avg_examples_per_pack']:.2f} pairs per pack -> model.global_batch_size={s['global_batch_size']} "
            f"model.micro_batch_size={s['micro_batch_size']} (packs)\n"
            f"  wrote {s['path']}")


def _next_steps(results) -> str:
    lines = ["to train on packed data (model.global_batch_size and model.micro_batch_size then count packs; the "
             "global batch must be a multiple of micro_batch_size x data-parallel size):"]
    for pack_size in next(iter(results.values())):
        prefix = ", ".join(f"{split}: [{stats[pack_size]['path']}]" for split, stats in results.items())
        train = results.get("train", next(iter(results.values())))[pack_size]
        lines.append(f"  python examples/nlp/gpt/train_gpt_dpo.py model.data.data_impl=packed_jsonl "
                     f"model.encoder_seq_length={pack_size} \"model.data.data_prefix={{{prefix}}}\" "
                     f"model.global_batch_size={train['global_batch_size']} "
                     f"model.micro_batch_size={train['micro_batch_size']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    with user_errors_exit():  # ConfigError, DataError, packing and file errors: one message, not a traceback
        cfg, args = parse_args(sys.argv[1:] if argv is None else argv)
        return prepare_packed_dpo(cfg, args)
