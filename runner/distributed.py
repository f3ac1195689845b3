"""Several processes, one job: launch detection, the agreed run folder, strategies and cross-process gathers.

``accelerate launch --num_processes N -m runner ...`` and ``torchrun --nproc_per_node N -m runner ...`` start
N copies of the command; each composes the config with Hydra and runs :func:`runner.job.execute`. The
copies agree on one run folder (rank 0's, broadcast), rank 0 alone writes files and talks to MLflow, and
each trains on its share of every batch (``runner.batching.ShardedBatches``).

How the model is spread over the processes is ``hardware.strategy``, a component chosen by ``_target_``
in ``conf/hardware/`` (``ddp``, ``fsdp``, ``deepspeed_zero2``, ``deepspeed_zero3``): it becomes the keyword
arguments of accelerate's ``Accelerator``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch

from runner.errors import RunnerError

log = logging.getLogger("runner")


def launched_rank() -> tuple[int, int]:
    """(rank, world size) set by ``torchrun`` / ``accelerate launch`` in the environment; (0, 1) otherwise.
    Read before anything is initialised: Hydra runs first, in every process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def accelerate_cpu_processes() -> int:
    """The ``--num_processes`` of an ``accelerate launch --cpu`` that started this process as its only one.

    accelerate runs multi-CPU jobs through ``mpirun`` only (with a hostfile in its config); otherwise its
    "simple launcher" starts one process, sets MASTER_ADDR/MASTER_PORT and no rank, and never says that
    the other N - 1 are missing (huggingface/accelerate#2741). Its command line is the parent's: read
    back with accelerate's own parser. 1 when this is not that situation.
    """
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1") or "WORLD_SIZE" in env or "MASTER_ADDR" not in env:
        return 1
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return 1
    # `accelerate launch ...` or `python -m accelerate.commands.launch ...`
    at = next((i for i, a in enumerate(argv) if a in ("launch", "accelerate.commands.launch")), None)
    if at is None:
        return 1
    from accelerate.commands.launch import launch_command_parser

    try:
        args, _ = launch_command_parser().parse_known_args(argv[at + 1 :])
    except SystemExit:
        return 1
    return int(args.num_processes or 1) if int(args.num_machines or 1) == 1 else 1  # several machines: mpirun's job


def cpu_relaunch(argv: list[str]) -> list[str] | None:
    """The ``torchrun`` command that runs this command on the N CPU processes ``accelerate launch --cpu
    --num_processes N`` asked for (gloo), or None when there is nothing to make up for."""
    n = accelerate_cpu_processes()
    if n <= 1:
        return None
    log.warning("accelerate launch --cpu --num_processes %d started one process: starting %d with torchrun", n, n)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
            os.environ["MASTER_ADDR"], "--master_port", os.environ.get("MASTER_PORT", "29500"), "-m", "runner", *argv]


def agree_on(value: str, accelerator) -> str:
    """Rank 0's ``value`` on every process (each rank's Hydra picked its own timestamped run folder)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def finish(accelerator) -> None:
    """A job's processes end together: each waits for the others, then closes the process group. A rank that
    exits while rank 0 still saves and measures leaves gloo's connection to die with the interpreter, which
    aborted that rank (SIGABRT) now and then, and the launcher then killed rank 0 and failed the job."""
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every process, rank order, with gradients flowing back to each process's own rows
    (in-batch negatives across processes). Every process passes the same number of rows (ShardedBatches)."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


def gather_ids(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather_rows`, for tensors without gradients (text ids, labels), gathered along dim ``-1``."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


class Strategy:
    """How one model is spread over the processes; turned into ``Accelerator(**accelerator_kwargs())``."""

    name = "single"
    needs_gpu = False
    shards_state = False  # weights or optimizer state split over the processes (FSDP, DeepSpeed)

    def accelerator_kwargs(self, grad_accum: int = 1, max_grad_norm: float = 0.0) -> dict:
        return {}

    def check(self, device: str, world: int) -> None:
        if self.needs_gpu and device != "gpu":
            raise RunnerError(f"hardware={self.name} needs CUDA GPUs (accelerate runs FSDP and DeepSpeed on CUDA only; "
                              f"on CPU it would quietly train with plain DDP): on CPU use hardware=ddp under "
                              f"accelerate launch --cpu, or hardware=cpu")
        if world > 1 and self.shards_state:
            # rank 0 saves the model and checkpoints from its own state: with shards that is a part of the
            # weights or optimizer state, a wrong artifact; gathering them (accelerator.get_state_dict on
            # every rank) is not wired and could not be run here without GPUs
            raise RunnerError(f"hardware={self.name}: saving and checkpointing sharded weights and optimizer state "
                              f"is not supported yet; use hardware=ddp (a full copy per process)")
        if world == 1 and self.name != "single":
            log.warning("hardware=%s but this is one process: start it with `accelerate launch --num_processes N -m "
                        "runner ...` (or torchrun --nproc_per_node N) to train on N processes", self.name)


class Single(Strategy):
    """No strategy chosen: plain DistributedDataParallel if a launcher started several processes."""


@dataclass
class DDP(Strategy):
    """DistributedDataParallel: a full copy of the model per process, gradients averaged every step."""

    find_unused_parameters: bool = False
    bucket_cap_mb: int = 25
    name = "ddp"

    def accelerator_kwargs(self, grad_accum: int = 1, max_grad_norm: float = 0.0) -> dict:
        from accelerate.utils import DistributedDataParallelKwargs

        return {"kwargs_handlers": [DistributedDataParallelKwargs(
            find_unused_parameters=self.find_unused_parameters, bucket_cap_mb=self.bucket_cap_mb)]}


@dataclass
class FSDP(Strategy):
    """Fully sharded data parallel (FSDP2 by default): parameters, gradients and optimizer state sharded
    over the processes; each transformer layer gathered for its forward and backward."""

    version: int = 2
    reshard_after_forward: bool = True  # ZeRO-3-like; false keeps gathered weights until backward (ZeRO-2-like)
    cpu_offload: bool = False
    auto_wrap_policy: str = "transformer_based_wrap"
    state_dict_type: str = "FULL_STATE_DICT"  # the saved model is one plain folder
    activation_checkpointing: bool = False
    name = "fsdp"
    needs_gpu = True
    shards_state = True

    def accelerator_kwargs(self, grad_accum: int = 1, max_grad_norm: float = 0.0) -> dict:
        from accelerate.utils import FullyShardedDataParallelPlugin

        return {"fsdp_plugin": FullyShardedDataParallelPlugin(
            fsdp_version=self.version, reshard_after_forward=self.reshard_after_forward, cpu_offload=self.cpu_offload,
            auto_wrap_policy=self.auto_wrap_policy, state_dict_type=self.state_dict_type,
            activation_checkpointing=self.activation_checkpointing)}


@dataclass
class DeepSpeed(Strategy):
    """DeepSpeed ZeRO through accelerate: stage 2 shards optimizer state and gradients, stage 3 the
    parameters too; ``offload_*=cpu`` moves them to host memory (slower, fits larger models)."""

    zero_stage: int = 2
    offload_optimizer_device: str = "none"  # none | cpu | nvme
    offload_param_device: str = "none"  # stage 3 only
    zero3_save_16bit_model: bool = True  # stage 3: gather the full weights on rank 0 for the saved model
    gradient_clipping: float | None = None  # None: train.max_grad_norm
    name = "deepspeed"
    needs_gpu = True
    shards_state = True

    def __post_init__(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise RunnerError(f"hardware.strategy.zero_stage={self.zero_stage}: use 1, 2 or 3")
        for key in ("offload_optimizer_device", "offload_param_device"):
            if getattr(self, key) not in ("none", "cpu", "nvme"):
                raise RunnerError(f"hardware.strategy.{key}={getattr(self, key)!r}: use none, cpu or nvme")
        if self.offload_param_device != "none" and self.zero_stage != 3:
            raise RunnerError("hardware.strategy.offload_param_device needs zero_stage=3 (hardware=deepspeed_zero3)")

    def accelerator_kwargs(self, grad_accum: int = 1, max_grad_norm: float = 0.0) -> dict:
        """DeepSpeed clips and accumulates itself: train.max_grad_norm and train.grad_accum go into its config."""
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise RunnerError(f"hardware={self.name}_zero{self.zero_stage} needs DeepSpeed: pip install deepspeed "
                              f"(on a machine with CUDA)") from err
        from accelerate.utils import DeepSpeedPlugin

        return {"deepspeed_plugin": DeepSpeedPlugin(
            zero_stage=self.zero_stage, offload_optimizer_device=self.offload_optimizer_device,
            offload_param_device=self.offload_param_device, zero3_save_16bit_model=self.zero3_save_16bit_model,
            gradient_accumulation_steps=grad_accum,
            gradient_clipping=self.gradient_clipping if self.gradient_clipping is not None else (max_grad_norm or None))}
