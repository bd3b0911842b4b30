"""PyTorch-native parallelism applied to a built model, never inside it.

mesh             launcher environment (torchrun / srun), sizes and their checks, the ("pp", "dp", "tp") mesh
tensor_parallel  DTensor plan for GPTModel and vocab-parallel log-probs
fsdp             FSDP2 over "dp" and global gradient-norm clipping
pipeline         stage split and the pipeline step executor (1F1B / GPipe)
export           Hugging Face export gathered to rank 0 a layer at a time
run              the order of application for a training run (pipeline -> tensor -> FSDP)
"""
