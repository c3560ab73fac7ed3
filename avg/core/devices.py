"""Devices of the evaluation entry points that run under ``torchrun`` without accelerate."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def process_device(cpu: bool) -> torch.device:
    """One device per process; torchrun's LOCAL_RANK picks the GPU and starts the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and not cpu
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")
