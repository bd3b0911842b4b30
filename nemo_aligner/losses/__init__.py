"""Training objectives: preference losses (DPO family, SimPO, ORPO) and their metrics."""

from nemo_aligner.losses.preference import (
    LOSS_TYPES,
    REFERENCE_FREE_LOSSES,
    combined_preference_loss,
    preference_loss,
    preference_metrics,
    sft_loss_from_logps,
)

__all__ = ["LOSS_TYPES", "REFERENCE_FREE_LOSSES", "combined_preference_loss", "preference_loss",
           "preference_metrics", "sft_loss_from_logps"]
