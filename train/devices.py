"""Where training runs: the process group (torchrun over gloo), the device, and the
environment that decides a run's floating-point path (kept in its training state)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from agevlm_edge.errors import BadInput


def world_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over every process (a copy, in float32)."""
    x = x.detach().clone().float()
    if world_info()[1] > 1:
        dist.all_reduce(x)
    return x


def maybe_init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        torch.set_num_threads(1)


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (CUDA when there is one and the run is one process), ``cpu``, ``cuda`` or
    ``cuda:N``; a device this machine lacks is one clear error."""
    device = (device or "cpu").strip().lower()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and world_info()[1] == 1 else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadInput(f"--device {device!r} is not a device; use auto, cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise BadInput(f"--device {device!r}: training runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(f"--device {device}: this torch build sees no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadInput(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
        if world_info()[1] > 1:
            raise BadInput("multi-process training (torchrun) runs on CPU with gloo; use --device cpu")
    return dev


def environment(device: torch.device) -> dict:
    """What decides a run's floating-point path: the same seeds give bit-identical weights only
    under the same torch build, kernel set and thread count. (Measured: 90 steps with
    ATEN_CPU_CAPABILITY=avx2 against this host's AVX512 kernels differ by 3e-3 in the weights,
    and over a whole recipe the runs part ways.) Kept in the run's state, one entry per stretch
    of training that ran somewhere else."""
    return {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
