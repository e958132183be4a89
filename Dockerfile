# One image for workers, the scheduler CLI, migrations and Flower.
# CUDA-capable base: PyTorch with its CUDA runtime; the host needs the NVIDIA container toolkit.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# g++: `compile: true` (torch.compile) builds its kernels with it, on CPUs and for Triton on
# GPUs, and the runtime image has no compiler (pytorch/pytorch#116696)
RUN apt-get update && apt-get install -y --no-install-recommends curl g++ && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 realfake
WORKDIR /app
COPY pyproject.toml README.md ./
COPY realfake ./realfake
COPY worker ./worker
COPY scheduler ./scheduler
# torch and torchvision come with the base image; pip keeps them
RUN pip install . && chown -R realfake /app
# a new named volume takes its mount point's owner from the image: without this, root's,
# and the workers could not write checkpoints or the torch cache there
RUN mkdir -p /artifacts && chown realfake /artifacts
USER realfake
CMD ["realfake-scheduler", "--help"]
