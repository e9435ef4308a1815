"""Data-parallel training under ``torchrun``: the process group, each rank's share of the batch, the DDP
or FSDP2 wrapping, and checkpoints through ``torch.distributed.checkpoint`` (DCP).

    train.parallel = "none"   one process (under torchrun with WORLD_SIZE > 1 this is an error: choose one)
                   = "ddp"    DistributedDataParallel: every rank holds the whole model, gradients all-reduced
                   = "fsdp"   FSDP2 (``fully_shard``) on each transformer block and on the root: parameters,
                              gradients and optimizer state sharded; bf16 parameters / fp32 reductions when
                              the run uses bf16

The global batch is ``train.batch_size``: every rank draws the same (seed, step) batch and keeps rows
``[rank * B/N, (rank + 1) * B/N)``, so the gradient (the mean of the ranks' means over equal token counts)
and the logged loss are those of the one-process step on the whole batch.

With ``parallel`` set, the model and optimizer are checkpointed with DCP in the folder ``checkpoint/``
(``get_state_dict``/``set_state_dict``: keys are the plain module's, shards are resharded on load), so a
run resumes on any number of processes, DDP or FSDP. DCP reads its shards with ``weights_only=True`` but
its metadata files with plain ``pickle.load``, which calls whatever a file names: ``load_checkpoint`` first
unpickles them allowing only what DCP writes there, so a file naming anything else is refused unloaded.
Without torchrun (no process group) a run with ``parallel`` set trains in one process and still reads and
writes that format: ``--resume`` on one process continues a run started on N.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .checkpoint import CheckpointError, describe_load_error
from .checkpoint import load_checkpoint as load_plain_data

CHECKPOINT_DIR = "checkpoint"
LOOP_STATE = "loop.pt"  # inside CHECKPOINT_DIR: step, random-number states, loop state (rank 0 writes it)
# What DCP's metadata files name (checked on torch 2.13, DDP and FSDP runs): its metadata dataclasses and
# enum, the storage record of its file system writer, torch.Size, dtypes and layouts, and the checkpoint's path.
METADATA_CLASSES = {
    name
    for name, obj in vars(dcp_metadata).items()
    if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__
}
METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}


class ParallelError(RuntimeError):
    """A parallel setup that cannot run (no mode chosen under torchrun, a batch the ranks cannot share)."""


@dataclass
class Parallel:
    """Where this process stands: ``rank`` of ``world_size``; ``owns_group`` if it created the group."""

    mode: str  # "none", "ddp" or "fsdp"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use (also a 1-process one under torchrun)."""
        return self.mode != "none" and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def torchrun_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(mode: str, device: torch.device) -> Parallel:
    """Joins (or, under torchrun, creates: nccl on CUDA, gloo on the CPU) the default process group."""
    if mode == "none":
        if torchrun_world_size() > 1:
            raise ParallelError(
                f"running under torchrun with WORLD_SIZE={torchrun_world_size()} but train.parallel is 'none': "
                "choose train.parallel=ddp or train.parallel=fsdp"
            )
        return Parallel("none")
    owns = False
    if not dist.is_initialized() and "RANK" in os.environ:  # torchrun's environment
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if not dist.is_initialized():
        return Parallel(mode)  # one process, DCP checkpoints
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Parallel(mode, dist.get_rank(), dist.get_world_size(), local_rank, owns)


def rank_device(device: torch.device, parallel: Parallel) -> torch.device:
    """This rank's GPU (``cuda:LOCAL_RANK``) on CUDA; the device as given otherwise."""
    if device.type == "cuda" and parallel.distributed:
        return torch.device("cuda", parallel.local_rank)
    return device


def local_rows(batch_size: int, parallel: Parallel) -> slice:
    """This rank's rows of the global batch."""
    if batch_size % parallel.world_size:
        raise ParallelError(
            f"train.batch_size ({batch_size}) is the global batch and must be a multiple of the number of "
            f"processes ({parallel.world_size})"
        )
    rows = batch_size // parallel.world_size
    return slice(parallel.rank * rows, (parallel.rank + 1) * rows)


def wrap(model: nn.Module, parallel: Parallel, device: torch.device, bf16: bool) -> nn.Module:
    """The module the training step calls: DDP around ``model``, or ``model`` itself sharded in place by
    FSDP2 (each of ``model.blocks``, then the root, which holds the embeddings, final norm and head)."""
    if not parallel.distributed:
        return model
    if parallel.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (parallel.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    options = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    for block in model.blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def mean_over_ranks(values: torch.Tensor, parallel: Parallel) -> torch.Tensor:
    """The element-wise mean of ``values`` over the ranks (gloo has no AVG: a SUM, then a division)."""
    if not parallel.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / parallel.world_size


def max_over_ranks(value: int, device: torch.device, parallel: Parallel) -> int:
    """The largest ``value`` of any rank (every rank must call it): e.g. the number of a signal one rank got."""
    if not parallel.distributed:
        return value
    tensor = torch.tensor([float(value)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def gather_objects(obj, parallel: Parallel) -> list:
    """``obj`` of every rank, in rank order."""
    if not parallel.distributed:
        return [obj]
    out = [None] * parallel.world_size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------- checkpoints


def checkpoint_exists(out: Path) -> bool:
    return (out / CHECKPOINT_DIR / LOOP_STATE).exists() or (out / f".{CHECKPOINT_DIR}.old" / LOOP_STATE).exists()


def save_checkpoint(out: Path, model: nn.Module, optimizer, loop_state: dict, parallel: Parallel) -> None:
    """Writes ``out/checkpoint/`` atomically: every rank saves its shards into a temporary folder; after a
    barrier rank 0 writes the loop state there and swaps the folders (the old one is renamed aside, the new
    one into place, the old one deleted). A crash leaves a whole checkpoint (``load_checkpoint`` falls back
    to the renamed-aside one)."""
    final, tmp, old = out / CHECKPOINT_DIR, out / f".{CHECKPOINT_DIR}.tmp", out / f".{CHECKPOINT_DIR}.old"
    if parallel.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    parallel.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _one_process_quietly(parallel):
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp, no_dist=not parallel.distributed)
    parallel.barrier()
    if parallel.is_main:
        torch.save(loop_state, tmp / LOOP_STATE)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()


def load_loop_state(out: Path) -> object:
    """The non-model state of ``out/checkpoint/`` (on every rank); ``CheckpointError`` if it cannot be loaded
    (truncated, corrupt, or naming objects other than plain data, which are never unpickled)."""
    return load_plain_data(_checkpoint_dir(out) / LOOP_STATE)


def load_checkpoint(out: Path, model: nn.Module, optimizer, parallel: Parallel) -> None:
    """Loads the model and optimizer state from ``out/checkpoint/`` into this rank's (sharded) model;
    ``CheckpointError`` if a metadata file names anything DCP does not write there, or a file is corrupt."""
    folder = _checkpoint_dir(out)
    for path in sorted(folder.glob("*.metadata")):  # .metadata, and the per-rank files DCP falls back to
        _check_metadata(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        with _one_process_quietly(parallel):
            dcp.load(state, checkpoint_id=folder, no_dist=not parallel.distributed)
    except CheckpointException as error:  # a BaseException: it wraps each rank's error
        failure = next(iter(error.failures.values()))[0]
        raise CheckpointError(folder, f"a shard cannot be loaded: {describe_load_error(failure)}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only the objects of ``METADATA_CLASSES`` and ``METADATA_GLOBALS`` and torch's dtypes."""

    def find_class(self, module: str, name: str):
        known = (module == dcp_metadata.__name__ and name in METADATA_CLASSES) or (module, name) in METADATA_GLOBALS
        if known or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def _check_metadata(path: Path) -> None:
    """Raises CheckpointError unless ``path`` unpickles with only what DCP writes in a metadata file."""
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except _Refused as error:
        reason = f"it names {error}, which DCP metadata never holds and which could run code when loaded"
        raise CheckpointError(path, f"{reason}; it was not loaded") from None
    except Exception as error:  # corrupt bytes fail in many ways; nothing but the restricted unpickler ran
        raise CheckpointError(path, f"the file is truncated or corrupt ({type(error).__name__}: {error})") from None


def _checkpoint_dir(out: Path) -> Path:
    final = out / CHECKPOINT_DIR
    return final if (final / LOOP_STATE).exists() else out / f".{CHECKPOINT_DIR}.old"


@contextlib.contextmanager
def _one_process_quietly(parallel: Parallel):
    """Without a process group DCP warns that it assumes one process, which is what a 1-process run means."""
    with warnings.catch_warnings():
        if not parallel.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
