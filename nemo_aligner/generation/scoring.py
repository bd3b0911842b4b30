"""Teacher-forced log-probs of completions under a GPTModel at a temperature: the definition the samplers'
log-probs follow (tests compare against it), and what the vLLM engine reports when top-k / top-p
truncation makes vLLM's own log-probs those of the truncated distribution.

Shapes: L tokens of one sequence, E hidden, V vocabulary.
"""

import torch
import torch.nn.functional as F

from nemo_aligner.losses.logprobs import softcap


@torch.no_grad()
def completion_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0,
                        chunk_size: int = 256) -> list[float]:
    """log p(completion token | everything before it) for each completion token, from logits / temperature
    (temperature 0 = untempered, as greedy sampling reports), fp32, a chunk of positions at a time."""
    if not completion_ids:
        return []
    ids_1L = torch.tensor([list(prompt_ids) + list(completion_ids)], device=next(model.parameters()).device)
    hidden_LE = model(ids_1L)[0, len(prompt_ids) - 1:-1]
    targets_L = ids_1L[0, len(prompt_ids):]
    out = []
    for start in range(0, len(targets_L), chunk_size):
        logits_LV = softcap(F.linear(hidden_LE[start:start + chunk_size], model.output_weight).float(),
                            model.config.final_logit_softcapping)
        if temperature > 0:
            logits_LV = logits_LV / temperature
        logps_LV = torch.log_softmax(logits_LV, dim=-1)
        out.append(logps_LV.gather(1, targets_L[start:start + chunk_size, None])[:, 0])
    return torch.cat(out).tolist()
