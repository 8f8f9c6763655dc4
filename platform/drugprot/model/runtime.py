"""Device choice and mixed precision, in one place for training, FGEMR and inference."""

from __future__ import annotations

import torch

from drugprot.errors import DrugprotError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DrugprotError("train.device: 'cuda' requested but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked; CPU always runs fp32 (bf16 matmuls there are slow and change results)."""
    enabled = device.type == "cuda" and precision == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def bf16_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy whose floating-point weights and buffers are bf16: the fast half of the CPU ``cascade`` path. CPUs with
    AMX or AVX512-BF16 run its matmuls through oneDNN's bf16 kernels; without them bf16 is emulated and slower than
    fp32. A copy rather than autocast: autocast re-casts every weight for every batch and keeps fp32 LayerNorms."""
    import copy

    return copy.deepcopy(module).to(torch.bfloat16)
