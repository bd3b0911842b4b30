"""The `nemo-aligner export` config: which run, which of its checkpoints, where the Hugging Face folder goes.

    nemo-aligner export run_dir=results/dpo_demo                       # the best checkpoint -> <run_dir>/hf_step_N
    nemo-aligner export run_dir=/results/dpo checkpoint=latest output_dir=/models/dpo-latest export_dtype=bf16

Nothing here imports torch.
"""

from dataclasses import dataclass
from typing import Optional

from nemo_aligner.config.sections import EXPORT_DTYPES, _choice


@dataclass
class ExportConfig:
    """What to export: the run's log dir (exp_manager.explicit_log_dir), a checkpoint, an output folder."""

    run_dir: Optional[str] = None  # a training run's log dir (holds checkpoints/); required
    checkpoint: str = "best"  # best (by the run's monitor) | latest | step_N | a checkpoint folder
    output_dir: Optional[str] = None  # the Hugging Face folder to write; null = <run_dir>/hf_<checkpoint name>
    export_dtype: Optional[str] = None  # fp32 | bf16 | fp16; null = the run's model.export_dtype rule (checkpoint's dtype)
    merge_on_export: Optional[bool] = None  # LoRA: merged weights instead of an adapter folder; null = the run's setting

    def __post_init__(self):
        _choice("export_dtype", self.export_dtype, EXPORT_DTYPES)
