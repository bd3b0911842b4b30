"""Tensor parallel for a built GPTModel with DTensor `parallelize_module` (Megatron's layout).

Per layer: q/k/v and gate/up are column-parallel (each rank holds a slice of the heads / of the FFN),
o and down are row-parallel (partial sums all-reduced). The embedding is vocab-parallel, and the
output projection is column-parallel over the vocabulary with its logits left sharded: per-token
log-probs come from `F.cross_entropy` under `loss_parallel()` (a max and a sum all-reduced per
token), so a [tokens, vocab] tensor is never gathered. Attention reads its head counts from tensor
shapes, so the model code is unchanged. Tied embeddings need nothing special: the embedding and the
output projection shard the same [V, E] weight the same way (Shard(0)). A score model's [1, E] head
(`models.score.ScoreModel`, `vocab_parallel_output = False`) stays replicated: every tp rank scores the
full hidden state it holds after the last row-parallel reduction.

Sequence parallel (model.sequence_parallel): between the row- and column-parallel blocks the
activations stay sharded over the sequence (norms run on T/tp tokens); attention and MLP inputs are
all-gathered, row-parallel outputs reduce-scattered. T must then be a multiple of tp (executors pad).
The extra norms of the sandwich / post-norm layouts (Gemma, OLMo 2) normalise row-parallel outputs, so
under sequence parallel they run on T/tp tokens too; without it they run replicated, as the pre-norms.

q/k norms (Qwen3, Gemma 3, OLMo 2) act on the column-parallel q/k outputs, i.e. on this rank's heads.
Their weights stay whole (Replicate DTensors, gradients all-reduced) and their input is marked sharded
over dim 2: the heads of [B, T, H, D] for a per-head norm (the RMS over D is local), the features of
[B, T, H*D] for OLMo 2's whole-projection norm, whose mean over the sharded dim DTensor turns into a
partial sum all-reduced across tp ([B, T, 1] per norm, not an all-gather of q and k); each rank then
scales by its own slice of the weight.

Shapes: N scored tokens, E hidden, V vocabulary.
"""

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel, loss_parallel, parallelize_module,
)

from nemo_aligner.losses.logprobs import LogProbFns, softcap
from nemo_aligner.losses.policy import PolicyFns
from nemo_aligner.models.lora import LoRALinear

_LOSS_PARALLEL_DEPTH = 0


@contextlib.contextmanager
def vocab_parallel_context(enabled: bool = True):
    """`loss_parallel()` that nests: forward *and* backward of vocab-parallel log-probs must run inside it
    (chunks are recomputed in backward). Executors wrap each step in it when tp > 1."""
    global _LOSS_PARALLEL_DEPTH
    if not enabled or _LOSS_PARALLEL_DEPTH > 0:
        _LOSS_PARALLEL_DEPTH += enabled
        try:
            yield
        finally:
            _LOSS_PARALLEL_DEPTH -= enabled
        return
    with loss_parallel():
        _LOSS_PARALLEL_DEPTH += 1
        try:
            yield
        finally:
            _LOSS_PARALLEL_DEPTH -= 1


def vocab_parallel_logprobs(hidden_NE: torch.Tensor, weight_VE: DTensor, targets_N: torch.Tensor,
                            with_correct: bool = False, logit_softcap: float | None = None):
    """log p(target) [N] from a vocab-sharded output weight (Shard(0) over a 1-D tp mesh); hidden is the
    full (replicated) hidden state. with_correct: also argmax == target, from per-shard maxima.
    logit_softcap: cap * tanh(logits / cap) first (final_logit_softcapping; elementwise, so shard-local).
    Installed in a model's log-prob head by `apply_tensor_parallel` (see `losses.logprobs.LogProbFns`)."""
    if _LOSS_PARALLEL_DEPTH == 0:
        raise RuntimeError("vocab-parallel log-probs must run inside nemo_aligner.parallel.tensor_parallel."
                           "vocab_parallel_context() (forward and backward)")
    mesh = weight_VE.device_mesh
    if mesh.ndim != 1 or not weight_VE.placements[0].is_shard(0):
        raise ValueError(f"vocab-parallel log-probs expect the output weight sharded over the vocabulary on a 1-D "
                         f"mesh; got placements {weight_VE.placements} on mesh {mesh.mesh_dim_names}")
    hidden = DTensor.from_local(hidden_NE, mesh, [Replicate()], run_check=False)
    logits_NV = F.linear(hidden, weight_VE).float()  # DTensor, Shard(-1): each rank holds V/tp columns
    logits_NV = softcap(logits_NV, logit_softcap)
    logps_N = -F.cross_entropy(logits_NV, targets_N, reduction="none")
    logps_N = logps_N.to_local() if isinstance(logps_N, DTensor) else logps_N
    if not with_correct:
        return logps_N
    return logps_N, _vocab_parallel_argmax(logits_NV.detach(), weight_VE) == targets_N


def _vocab_parallel_logprobs(hidden_NE, weight_VE, targets_N, logit_softcap=None):
    return vocab_parallel_logprobs(hidden_NE, weight_VE, targets_N, logit_softcap=logit_softcap)


def _vocab_parallel_logprobs_and_correct(hidden_NE, weight_VE, targets_N, logit_softcap=None):
    return vocab_parallel_logprobs(hidden_NE, weight_VE, targets_N, with_correct=True, logit_softcap=logit_softcap)


VOCAB_PARALLEL = LogProbFns(_vocab_parallel_logprobs, _vocab_parallel_logprobs_and_correct)


def vocab_parallel_logprobs_and_entropy(hidden_NE: torch.Tensor, weight_VE: DTensor, targets_N: torch.Tensor,
                                        temperature: float = 1.0, logit_softcap: float | None = None,
                                        entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [N], entropy [N]) of softmax(logits / temperature) from a vocab-sharded output weight:
    the log-probs through `loss_parallel()`'s cross-entropy, the entropy from a vocab-parallel logsumexp
    (a max, then exp-sums, all-reduced over tp: H = m + log Σe^(z-m) - Σe^(z-m)z / Σe^(z-m)). The entropy
    is a metric here (no gradient); an entropy bonus under tensor parallel is refused."""
    if entropy_grad:
        raise ValueError("an entropy gradient (entropy bonus) under tensor parallel is not supported")
    if _LOSS_PARALLEL_DEPTH == 0:
        raise RuntimeError("vocab-parallel log-probs must run inside nemo_aligner.parallel.tensor_parallel."
                           "vocab_parallel_context() (forward and backward)")
    mesh = weight_VE.device_mesh
    hidden = DTensor.from_local(hidden_NE, mesh, [Replicate()], run_check=False)
    logits_NV = softcap(F.linear(hidden, weight_VE).float(), logit_softcap)  # DTensor, Shard(-1)
    if temperature != 1.0:
        logits_NV = logits_NV / temperature
    logps_N = -F.cross_entropy(logits_NV, targets_N, reduction="none")
    logps_N = logps_N.to_local() if isinstance(logps_N, DTensor) else logps_N
    with torch.no_grad():
        local_NV = logits_NV.detach().to_local()
        group = mesh.get_group()
        max_N = local_NV.max(dim=-1).values
        dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=group)
        exp_NV = torch.exp(local_NV - max_N[:, None])
        sums_2N = torch.stack([exp_NV.sum(-1), (exp_NV * local_NV).sum(-1)])
        dist.all_reduce(sums_2N, group=group)
        entropy_N = max_N + torch.log(sums_2N[0]) - sums_2N[1] / sums_2N[0]
    return logps_N, entropy_N


VOCAB_PARALLEL_POLICY = PolicyFns(vocab_parallel_logprobs_and_entropy)
# what a head's plain projection functions become when its output weight is vocab-sharded
_VOCAB_PARALLEL_FOR = {LogProbFns: VOCAB_PARALLEL, PolicyFns: VOCAB_PARALLEL_POLICY}


def _vocab_parallel_argmax(logits_NV: DTensor, weight_VE: DTensor) -> torch.Tensor:
    """Global argmax over sharded columns: each rank's (max, index), all-gathered ([tp, N, 2] floats)."""
    local_NV = logits_NV.to_local()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(weight_VE.shape, weight_VE.device_mesh, weight_VE.placements)
    if local_NV.shape[-1] == 0:
        best, idx = local_NV.new_full(local_NV.shape[:-1], float("-inf")), local_NV.new_zeros(local_NV.shape[:-1])
    else:
        best, idx = local_NV.max(dim=-1)
    mine = torch.stack([best, (idx + offset[0]).to(best.dtype)], dim=-1)
    group = weight_VE.device_mesh.get_group()
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    stacked = torch.stack(gathered)  # ranks in vocabulary order: the first maximum wins, as torch.argmax
    winner = stacked[..., 0].argmax(dim=0)
    return stacked[..., 1].gather(0, winner[None]).squeeze(0).long()


@torch.no_grad()
def reduce_partial_grads(params) -> None:
    """Complete gradients DTensor left as partial sums: a replicated weight used on sequence-sharded
    activations (norms and LoRA B under sequence parallel) gets a Partial gradient, which FSDP would
    reduce; without FSDP (data-parallel size 1) it is all-reduced here, as Megatron finalises them."""
    for p in params:
        grad = p.grad
        if isinstance(grad, DTensor) and any(pl.is_partial() for pl in grad.placements):
            placements = [Replicate() if pl.is_partial() else pl for pl in grad.placements]
            p.grad = grad.redistribute(grad.device_mesh, placements)


def layer_plan(sequence_parallel: bool, layer: torch.nn.Module) -> dict:
    """The plan of one TransformerLayer, for the modules `layer` has (a plain MLP has no gate_proj, OLMo 2 no
    pre-norms, only some families q/k norms or output norms)."""
    row_out = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "self_attention.q_proj": ColwiseParallel(),
        "self_attention.k_proj": ColwiseParallel(),
        "self_attention.v_proj": ColwiseParallel(),
        "self_attention.o_proj": RowwiseParallel(output_layouts=row_out),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=row_out),
        "self_attention.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
        "self_attention.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
    }
    if sequence_parallel:
        plan |= {
            "input_norm": SequenceParallel(),
            "post_attention_norm": SequenceParallel(),
            # outputs added to the (local, sequence-sharded) residual stream: local tensors out
            "attention_output_norm": SequenceParallel(use_local_output=True),
            "mlp_output_norm": SequenceParallel(use_local_output=True),
            "self_attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                 desired_input_layouts=(Replicate(), None, None)),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        }
    return {name: style for name, style in plan.items() if _has_module(layer, name)}


def _has_module(layer: torch.nn.Module, name: str) -> bool:
    try:
        layer.get_submodule(name)
    except AttributeError:  # an absent module (None in the layer: its norm placement has no such norm)
        return False
    return True


def apply_tensor_parallel(module, tp_mesh, sequence_parallel: bool = False):
    """Shard a GPTModel (or a ModelWithHead around one, or a pipeline stage of either) over `tp_mesh` in place.
    A log-prob head then projects with the vocab-parallel function (the output weight is vocab-sharded)."""
    model = getattr(module, "model", module)
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    for layer in model.layers.values():
        plan = layer_plan(sequence_parallel, layer)
        parallelize_module(layer, tp_mesh, lora_tp_plan(layer, plan))  # LoRA: A/B sharded like their base
    embed_out = Shard(1) if sequence_parallel else Replicate()
    if model.embedding is not None:
        parallelize_module(model.embedding, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=embed_out))
    if model.position_embedding is not None and sequence_parallel:
        # added to the sequence-sharded token embeddings, so it must come out sharded the same way
        parallelize_module(model.position_embedding, tp_mesh,
                           RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)))
    if model.output_layer is not None and getattr(model, "vocab_parallel_output", True):  # a score head stays whole
        parallelize_module(model.output_layer, tp_mesh,
                           ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
    head = getattr(module, "head", None)
    if head is not None and hasattr(head, "fns"):  # the output weight (or tied embedding) is vocab-sharded
        head.fns = _VOCAB_PARALLEL_FOR[type(head.fns)]
    if sequence_parallel and model.final_norm is not None:
        parallelize_module(model.final_norm, tp_mesh, SequenceParallel())
        if head is not None:  # gather the sequence before projecting to the vocabulary
            parallelize_module(head, tp_mesh, PrepareModuleInput(
                input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None),
                use_local_output=True))
    for name, p in module.named_parameters():  # SequenceParallel re-creates parameters with requires_grad=True
        p.requires_grad_(name not in frozen)  # (a LoRA run's frozen norms would start training)
    return module


def lora_tp_plan(module: nn.Module, plan: dict) -> dict:
    """A tensor-parallel plan rewritten for LoRA-wrapped entries of `module` (a transformer layer).

    Column-parallel base (q/k/v, gate/up): B is sharded like the base (Shard(0) of [out, r]) and A is
    replicated (a plain tensor fed the local copy of the replicated input, which sequence parallel hands
    over as a DTensor); B's input-gradient all-reduce (ColwiseParallel's) also completes A's gradient.
    Row-parallel base (o, down): A is sharded like the base (Shard(1) of [r, in]), its [.., r] partial
    sums are reduced (cheaper than reducing [.., out]) and B, replicated, runs on the result. With sequence parallel the row-parallel output is sequence-sharded, so B
    becomes a Replicate DTensor over sequence-sharded input (SequenceParallel) and its gradient is
    all-reduced like a norm weight's. Entries that are not LoRA-wrapped pass through unchanged.
    """
    out = {}
    for name, style in plan.items():
        try:
            target = module.get_submodule(name)
        except AttributeError:
            out[name] = style
            continue
        if not isinstance(target, LoRALinear):
            out[name] = style
            continue
        out[f"{name}.base"] = style
        if isinstance(style, ColwiseParallel):
            if style.input_layouts[0] != Replicate():
                raise ValueError(f"LoRA on {name}: column-parallel base with input layout "
                                  f"{style.input_layouts[0]} (expected Replicate)")
            out[f"{name}.lora_A"] = PrepareModuleInput(input_layouts=(Replicate(),),
                                                       desired_input_layouts=(Replicate(),), use_local_output=True)
            out[f"{name}.lora_B"] = ColwiseParallel(output_layouts=style.output_layouts[0],
                                                    use_local_output=style.use_local_output)
        elif isinstance(style, RowwiseParallel):
            out[f"{name}.lora_A"] = RowwiseParallel(input_layouts=style.input_layouts[0],
                                                    output_layouts=style.output_layouts[0],
                                                    use_local_output=style.use_local_output)
            if style.output_layouts[0] != Replicate():
                out[f"{name}.lora_B"] = SequenceParallel(sequence_dim=style.output_layouts[0].dim,
                                                         use_local_output=True)
        else:
            raise ValueError(f"LoRA on {name}: no tensor-parallel rule for {type(style).__name__}")
    return out
