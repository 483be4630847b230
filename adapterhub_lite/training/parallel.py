"""One process or many: data parallelism through accelerate (torchrun / `accelerate launch`).

    accelerate launch --num_processes 8 -m adapterhub_lite.cli train scripts/tasks/sst2.yaml
    torchrun --nproc_per_node 2 -m adapterhub_lite.cli train-multi …

Each process loads the frozen backbone on its own device (`device_map={"": local_rank}`:
bitsandbytes models cannot be moved after loading, and `device_map="auto"` would split the layers
over the GPUs). The model holding the adapter is wrapped for DDP by accelerate, so the adapter's
gradients are averaged over the processes in backward; every process draws the same global batch
and computes its share. Rank 0 alone writes files; evaluation runs on every process, each predicting its
share of the dev rows, and the predictions are gathered and scored on each, so every process takes the
same decisions (keep best, stop, sample tasks).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import uuid
from pathlib import Path

import torch

from adapterhub_lite.training.progress import TrainingError

# Quantization × sharding: what works. bitsandbytes 8-bit under FSDP is broken upstream; 4-bit
# works under FSDP/ZeRO-3 only with bnb_4bit_quant_storage equal to the compute dtype.
_FSDP_PROBLEMS = {
    "8bit": "bitsandbytes 8-bit weights cannot be sharded by FSDP/DeepSpeed ZeRO-3 (broken upstream); use quantization=4bit "
            "(with its quant storage equal to the compute dtype) or plain data parallelism (DDP)",
}


def launched() -> bool:
    """Whether this process was started by torchrun / accelerate launch (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: str | None) -> str | None:
    """The device this process loads the backbone on: under a launcher, its own GPU (cuda:LOCAL_RANK)."""
    if launched() and torch.cuda.is_available() and (device in (None, "cuda")):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def follow_launcher() -> None:
    """Under a launcher on Linux, have the kernel end this process (SIGTERM) when the launcher dies.

    torchrun starts each process in a session of its own and stops them itself; a launcher that is SIGKILLed (a scheduler's
    hard kill, the OOM killer) cannot, and its processes would train on alone, holding their devices, and write the output
    folder minutes later, while the run looks stopped. SIGTERM's default
    action ends the process where it is: the work folder keeps its last checkpoint, and --resume continues it."""
    if not launched() or not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
    with contextlib.suppress(OSError, AttributeError):  # no prctl here (another libc): the launcher's own teardown only
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the launcher died before the request was made: nobody is left to signal us
        os.kill(os.getpid(), signal.SIGTERM)


class Parallel:
    """The process group of a run, through one `accelerate.Accelerator` (a no-op when alone)."""

    def __init__(self, device: torch.device, quantization: str = "none"):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        follow_launcher()

        # step_scheduler_with_optimizer=False: the schedule advances once per optimizer step whatever
        # the process count (accelerate would otherwise step it once per process), as in one process.
        # cpu=True only under a launcher (it picks gloo over NCCL there). Alone, the device does not matter
        # (device_placement=False) and cpu=True would be refused once a CUDA state exists in this process
        # (an earlier run on the GPU): accelerate's state is process-wide and cannot change device.
        cpu = device.type == "cpu" and launched()
        self.accelerator = Accelerator(cpu=cpu, device_placement=False, step_scheduler_with_optimizer=False)
        state = self.accelerator.state
        if state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) and quantization in _FSDP_PROBLEMS:
            raise TrainingError(_FSDP_PROBLEMS[quantization])
        self.rank, self.world = state.process_index, state.num_processes
        self.main = state.is_main_process

    def prepare(self, model, optimizer, scheduler):
        """Wrap the model for DDP (a no-op when alone) and the optimizer/scheduler for accelerate."""
        return self.accelerator.prepare(model, optimizer, scheduler)

    def no_sync(self, model, skip: bool):
        """A context in which DDP does not all-reduce the gradients of `model` (when `skip`): the micro-batches before
        a step's last accumulate locally, and the last one's backward averages them all at once."""
        return self.accelerator.no_sync(model) if skip and self.world > 1 else contextlib.nullcontext()

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average over the processes (the tensor itself when alone)."""
        return tensor if self.world == 1 else self.accelerator.reduce(tensor, "mean")

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.world == 1 else self.accelerator.reduce(tensor, "sum")

    def gather(self, obj) -> list:
        """Every process's value of a picklable object, in rank order, on every process."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def seed_ranks(self, seed: int) -> None:
        """Give each process above rank 0 torch generators of its own (seed + rank, torchtune's rule) for what training draws
        at random, dropout: seeded alike, every process drew the very same masks for its rows, so the global batch's dropout
        noise was one process's, repeated. Rank 0 keeps its stream (one process's). Call after the adapter is initialised
        (DDP broadcasts rank 0's weights anyway); the data order and task sampling use generators of their own."""
        if self.rank > 0:
            torch.manual_seed(seed + self.rank)

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def check_shared(self, folder: Path) -> None:
        """Refuse a run whose processes do not all see `folder` (the output's parent: several machines without shared
        storage). Each process writes its RNG state into every checkpoint there and rank 0 swaps the checkpoint in, so on
        another machine's own disk that part would be left in a stray `checkpoint.tmp/`, the checkpoint would lack it, and
        a --resume there would be refused ('checkpoint does not exist'), while the run itself ends with exit 0. Rank 0 leaves a
        file named by a random token, and every process looks for it (nothing stays behind)."""
        if self.world == 1:
            return
        # The name travels, not rank 0's path: each process looks in the folder as it names it (the same --output,
        # relative to its own working directory on its own machine).
        name = self.gather(f".adapterhub-shared-{uuid.uuid4().hex}" if self.main else None)[0]
        probe = Path(folder) / name
        if self.main:
            probe.touch()
        self.barrier()  # the file is there before anyone looks
        # a collective: when it returns, every process has looked, and the file may go
        blind = [(rank, host) for rank, (seen, host) in enumerate(self.gather((probe.exists(), socket.gethostname()))) if not seen]
        if self.main:
            probe.unlink(missing_ok=True)
        if blind:
            ranks = ", ".join(f"rank {rank} on {host}" for rank, host in blind)
            raise TrainingError(f"--output's folder {str(folder)!r} is not on storage every process sees ({ranks} does not see a file "
                                "rank 0 wrote there): each process writes its part of every checkpoint into it; give an --output on "
                                "a filesystem all the machines share")

    def agree(self, failed: bool) -> bool:
        """Whether any process failed (every process gets the same answer), so all stop together."""
        if self.world == 1:
            return failed
        flag = torch.tensor([1.0 if failed else 0.0], device=self.accelerator.device)
        return bool(self.total(flag).item())
