"""The `nemo-aligner` command: one subcommand per recipe, with the examples/ scripts' command lines.

    nemo-aligner dpo                                   # the bundled CPU demo (no checkpoint, no data)
    nemo-aligner dpo pretrained_checkpoint.restore_from_path=/models/x "model.data.data_prefix={train: [t.jsonl]}"
    nemo-aligner dpo --help                            # every key: default and what it does (from the schema)
    nemo-aligner export run_dir=results/dpo_demo checkpoint=best output_dir=/tmp/hf
    torchrun --nproc_per_node=4 -m nemo_aligner.cli dpo trainer.devices=4 ...

Training, generation and packing run exactly what examples/nlp/gpt/*.py and
examples/nlp/data/dpo/prepare_packed_dpo_dataset.py run (those scripts call `run_command`): the config files
ship inside the package (nemo_aligner/conf/), the demo assets too (nemo_aligner/demo/), so the commands work
from any directory after `pip install`. Hydra's own flags (--config-path/--config-name, -m, hydra.*) work
as with the scripts; a NeMo-Aligner config file is accepted (`--config-path=<dir> --config-name=gpt_dpo`).
"""

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent / "conf"


@dataclass(frozen=True)
class Command:
    summary: str
    schema: str  # "module:attribute" of the run config dataclass
    run: str  # "module:function" called with the validated config (or with argv, for non-Hydra commands)
    config: str | None = None  # Hydra config name under conf/ (None: the command parses its own arguments)
    schema_name: str | None = None  # the ConfigStore name the YAML's defaults list refers to
    demo: bool = False  # conf/demo/<config>.yaml applies to a run with no checkpoint and no data
    demo_run: str | None = None  # "module:function" run instead of `run` for the demo (e.g. PPO trains its RM first)


COMMANDS = {
    "sft": Command("supervised fine-tuning (NeMo-Aligner's gpt_sft keys)", "nemo_aligner.config.sft:SFTRunConfig",
                   "nemo_aligner.recipes.sft:run_sft", "gpt_sft", "sft_schema", demo=True),
    "dpo": Command("DPO and its family: IPO, RPO, SimPO, ORPO, ... (gpt_dpo keys)",
                   "nemo_aligner.config.dpo:DPORunConfig", "nemo_aligner.recipes.dpo:run_dpo", "gpt_dpo",
                   "dpo_schema", demo=True),
    "rm": Command("Bradley-Terry reward models (training_rm keys)", "nemo_aligner.config.rm:RMRunConfig",
                  "nemo_aligner.recipes.rm:run_rm", "training_rm", "rm_schema", demo=True),
    "grpo": Command("GRPO and its family: DAPO, Dr. GRPO, GSPO, BNPO, RLOO, REINFORCE++ (gpt_grpo keys)",
                    "nemo_aligner.config.grpo:GRPORunConfig", "nemo_aligner.recipes.grpo:run_grpo", "gpt_grpo",
                    "grpo_schema", demo=True),
    "ppo": Command("PPO: actor, reference, reward model and critic in one job (NeMo PPO keys, TRL PPOConfig)",
                   "nemo_aligner.config.ppo:PPORunConfig", "nemo_aligner.recipes.ppo:run_ppo", "gpt_ppo",
                   "ppo_schema", demo=True, demo_run="nemo_aligner.cli:ppo_demo"),
    "generate": Command("sample completions for a jsonl of prompts", "nemo_aligner.config.generate:GenerateRunConfig",
                        "nemo_aligner.recipes.generate:run_generate", "generate", "generate_schema"),
    "pack": Command("pack DPO pairs offline (prepare_packed_dpo_dataset.py's keys)",
                    "nemo_aligner.config.dpo:DPORunConfig", "nemo_aligner.recipes.prepare_packed_dpo:main"),
    "export": Command("export a training checkpoint (best or latest) to a Hugging Face folder",
                      "nemo_aligner.config.export:ExportConfig", "nemo_aligner.recipes.export:main"),
}


def _load(spec: str):
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


def ppo_demo(cfg) -> dict:
    """The PPO demo scores with the reward model that the `rm` demo trains: trained first, exactly as
    `nemo-aligner rm` would (same preset, same log dir), when its hf/ is not there yet; then PPO."""
    from nemo_aligner.config import RMRunConfig, load_config
    from nemo_aligner.config.presets import with_preset
    from nemo_aligner.recipes.ppo import run_ppo
    from nemo_aligner.recipes.rm import run_rm

    rm_demo = load_config(with_preset({}, CONF_DIR / "demo" / "training_rm.yaml"), RMRunConfig)
    wanted = Path(cfg.reward_model.restore_from_path)
    if wanted == Path(rm_demo.exp_manager.explicit_log_dir) / "hf" and not wanted.is_dir():
        run_rm(rm_demo)
    return run_ppo(cfg)


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("nemo_aligner")
    except PackageNotFoundError:
        return "unknown (not installed)"


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"nemo-aligner {version()}: align GPT-style language models (SFT, DPO family, reward models, ...)",
             "", "usage: nemo-aligner <command> [key=value ...]    (nemo-aligner <command> --help: every key)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "Each command takes Hydra overrides with NeMo-Aligner's key names; with no checkpoint and no data the",
              "training commands run their bundled CPU demo. Docs: README.md and docs/ in the repository."]
    return "\n".join(lines)


def wants_help(argv: list[str]) -> bool:
    return any(arg in ("--help", "-h") for arg in argv)


def _print(text: str) -> None:
    """Print help; a reader that stops early (`| head`) ends it quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        sys.stdout = None  # nothing more to flush at exit


def run_command(name: str, argv: list[str] | None = None) -> None:
    """Run subcommand `name` with `argv` (default: sys.argv[1:]), as `nemo-aligner <name> <argv>` does."""
    command = COMMANDS[name]
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        from nemo_aligner.config.describe import help_text

        text = help_text(_load(command.schema), f"nemo-aligner {name}")
        if command.config is None:  # its own arguments (pack's +output_dir, ...) come first, from its docstring
            text = f"{importlib.import_module(command.run.partition(':')[0]).__doc__.strip()}\n\n{text}"
        _print(text)
        return
    if command.config is None:
        _load(command.run)(argv)
        return
    _run_hydra(name, command, argv)


def _run_hydra(name: str, command: Command, argv: list[str]) -> None:
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig

    from nemo_aligner.recipes.skeleton import main_entry

    schema = _load(command.schema)
    ConfigStore.instance().store(name=command.schema_name, node=schema)  # the base of conf/<config>.yaml
    demo = CONF_DIR / "demo" / f"{command.config}.yaml" if command.demo else None

    def main(raw: DictConfig) -> None:
        # demo preset with no checkpoint and no data; one-line user errors (exit 1); exit 75 when stopped to resume
        from nemo_aligner.config.presets import is_demo_run

        run = command.demo_run if command.demo_run and is_demo_run(raw) else command.run
        main_entry(raw, schema, _load(run), demo=demo)

    main.__module__ = __name__
    sys.argv = [f"nemo-aligner-{name}", *argv]  # Hydra reads the overrides from sys.argv
    hydra.main(config_path=str(CONF_DIR), config_name=command.config, version_base="1.3")(main)()


def main(argv: list[str] | None = None) -> None:
    """The console script: `nemo-aligner <command> ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("--help", "-h", "help"):
        _print(usage())
        return
    if argv[0] == "--version":
        print(version())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"nemo-aligner: unknown command {name!r}; expected one of {', '.join(COMMANDS)} "
                 "(nemo-aligner --help lists them)")
    run_command(name, rest)


if __name__ == "__main__":
    main()
