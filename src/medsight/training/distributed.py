"""Data-parallel training on PyTorch's own engine: ``torchrun`` starts the processes and its
rendezvous joins them; this module reads what torchrun set, starts the process group (NCCL
on GPUs, gloo on CPUs) and gives the trainer the few collective steps it needs.

``--batch-size`` stays the *global* batch: each of N processes takes ``batch_size // N``
images a step and DDP averages their gradients, so the optimiser sees the batch (and the
learning rate) the config names, whatever N is. A run trained on 1, 2 or 8 processes follows
the same recipe; to grow the batch with the GPUs, raise ``--batch-size`` (and ``--lr``).

>>> context = from_environment()            # outside torchrun: one process   # doctest: +SKIP
>>> context.world_size, context.main
(1, True)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from medsight.devices import resolve_device
from medsight.errors import ConfigError

#: How long a process waits for the others at a collective step before torchrun is told it
#: failed (the first validation of a large set can take minutes on CPUs).
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Context:
    """Where this process stands among the training processes (one, outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        """More than one process trains."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """This process writes the run (rank 0)."""
        return self.rank == 0

    # ------------------------------------------------------------------ collective steps

    def agree(self, value):
        """Rank 0's ``value`` on every process (a decision taken once: stop, the plan)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every process's ``value``, in rank order, on every process."""
        if not self.active:
            return [value]
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def sum(self, *numbers: float) -> tuple[float, ...]:
        """Each number summed over the processes."""
        if not self.active:
            return numbers
        return tuple(float(sum(v)) for v in zip(*self.gather(numbers)))


def from_environment() -> Context:
    """The :class:`Context` torchrun's environment describes (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    return Context(
        rank=int(os.environ["RANK"]),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


def start(device_spec: str = "auto") -> tuple[Context, torch.device]:
    """Join the process group torchrun prepared (once per process) and pick this process's
    device: under torchrun, ``auto`` and ``cuda`` mean the GPU of its local rank."""
    context = from_environment()
    if not context.active:
        return context, resolve_device(device_spec)
    spec = (device_spec or "auto").strip().lower()
    if spec in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if context.local_rank >= count:
            raise ConfigError(
                f"torchrun started {context.local_world_size} processes on this node but it has "
                f"{count} GPU(s); give --nproc-per-node {count} or fewer"
            )
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    else:
        device = resolve_device(spec)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    if device.type == "cpu":
        # Processes sharing a machine share its cores: one torch thread pool each, sized so
        # that together they do not oversubscribe it.
        per_process = max(1, (os.cpu_count() or 1) // context.local_world_size)
        torch.set_num_threads(per_process)
    return Context(
        context.rank, context.world_size, context.local_rank, context.local_world_size, backend
    ), device


def stop(context: Context) -> None:
    """Leave the process group (after the last collective step)."""
    if context.active and dist.is_initialized():
        dist.destroy_process_group()


def sync_buffers(context: Context, model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every process, after a step: each
    process updated them from its own images, and the weights kept, their average and the
    validations must not depend on which process holds them."""
    if context.active:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def weights_digest(model: torch.nn.Module) -> str:
    """A SHA-256 over the model's parameters and buffers, in name order: equal digests on all
    ranks show DDP kept the replicas identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def launch(nproc: int, argv: list[str]) -> int:
    """``medsight train --nproc N ...``: start ``torchrun --standalone --nproc-per-node N -m
    medsight train ...`` on this machine and return its exit status. ``nproc`` beyond the
    GPUs (on a GPU machine) or the cores (on a CPU one) is refused with the reason."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cores = os.cpu_count() or 1
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give 1 or more processes")
    if gpus and nproc > gpus:
        raise ConfigError(
            f"--nproc {nproc}: this machine has {gpus} GPU(s); one process per GPU, so give "
            f"--nproc {gpus} or fewer"
        )
    if not gpus and nproc > cores:
        raise ConfigError(
            f"--nproc {nproc}: this machine has {cores} CPU core(s) and no GPU; more processes "
            f"than cores only compete for them, so give --nproc {cores} or fewer"
        )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "medsight",
        *argv,
    ]
    env = dict(os.environ)
    if not gpus:
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    return subprocess.call(command, env=env)
