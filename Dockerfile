# nemo_aligner on a CUDA PyTorch image: torch (with NCCL) comes from the base image and is kept;
# pip installs only this package and its pure-Python dependencies.
#   docker build -t nemo_aligner .
#   docker run --gpus all --ipc=host -v /models:/models -v /results:/results nemo_aligner \
#       torchrun --nproc_per_node=8 examples/nlp/gpt/train_gpt_dpo.py trainer.devices=8 ...
# The code is tested against torch 2.13 (Makefile pin); use a base image with that torch (or newer):
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3 -t nemo_aligner .
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /workspace
COPY pyproject.toml README.md ./
COPY nemo_aligner ./nemo_aligner
COPY examples ./examples
COPY benchmarks ./benchmarks

# The base image's torch satisfies `torch>=2.6`, so pip leaves it (and its CUDA libraries) alone.
RUN python -m pip install --upgrade pip && \
    python -m pip install -e . && \
    python -c "import torch, nemo_aligner.recipes.dpo; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

CMD ["python", "examples/nlp/gpt/train_gpt_dpo.py", "--help"]
