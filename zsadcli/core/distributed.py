"""torch.distributed for zsad, in one place: who this process is, which share of the work it does,
how results come back to rank 0, and who writes.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group starts on first
use: gloo for host tensors and, where CUDA is present, NCCL for device tensors (one backend string,
``cpu:gloo,cuda:nccl``), one process per device (``cuda:LOCAL_RANK``). A plain process never starts
a group and every function here is then the identity or a no-op, so single-process runs are
unchanged. Commands and methods know one thing: ``is_writer()``.

Work is split in whole batches (never items within a batch), contiguously and in rank order, so
every rank forms exactly the batches a single process would form and gathering in rank order
restores the original item order: sharded results equal single-process ones, bit for bit.
"""
from __future__ import annotations

import atexit
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

from zsadcli.errors import ZsadError

if TYPE_CHECKING:  # torch is imported where it is used: `is_writer` must stay cheap (every command calls it)
    import torch

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


def world() -> World:
    """This process's place in the job, from the variables torchrun sets (a plain run: rank 0 of 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    return World(rank=int(os.environ.get("RANK", "0")), world_size=size,
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def is_writer() -> bool:
    """Rank 0 alone writes files and prints tables/results; every rank of a plain run is rank 0."""
    return world().is_writer


def _group_started() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _ensure_group() -> bool:
    """Start the process group on first use under torchrun; False in a plain process."""
    if not world().sharded:
        return False
    if not _group_started():
        import torch.distributed as dist

        import torch

        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        # Rank 0 computes a class's metrics while the others wait at the next gather: on a large class
        # that takes minutes, beyond NCCL's 10-minute default. A rank that dies ends the job anyway
        # (torchrun stops the others), so a long wait never hangs it.
        dist.init_process_group(backend=backend, timeout=timedelta(hours=2))
        atexit.register(_shutdown)
    return True


def _shutdown() -> None:
    if _group_started():
        import torch.distributed as dist

        dist.destroy_process_group()


def finish() -> None:
    """After a command succeeded on this rank: wait for every rank, then close the group. Without
    the wait a rank that is done early (not the writer) tears its connections down while rank 0
    still writes, and gloo may abort that rank at exit. A rank that fails instead makes torchrun
    stop the waiting ones."""
    if _group_started():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """One process per device: under torchrun a CUDA run uses cuda:LOCAL_RANK whatever index was asked."""
    import torch

    here = world()
    if not here.sharded or device.type != "cuda":
        return device
    bound = torch.device("cuda", here.local_rank)
    torch.cuda.set_device(bound)
    return bound


def default_workers() -> int:
    """Data-loading processes per rank: min(4, CPUs - 1), the CPUs divided among the node's ranks."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus // world().local_world_size - 1))


# ---------------------------------------------------------------------- splitting the work
def shard_range(n_items: int, batch_size: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The items ``rank`` scores: a contiguous run of whole batches (empty when there are more ranks
    than batches). Batches are those a single process forms: [0, b), [b, 2b), ..."""
    here = world()
    rank = here.rank if rank is None else rank
    world_size = here.world_size if world_size is None else world_size
    n_batches = -(-n_items // batch_size)
    first, last = rank * n_batches // world_size, (rank + 1) * n_batches // world_size
    return range(min(first * batch_size, n_items), min(last * batch_size, n_items))


# ---------------------------------------------------------------------- agreeing and gathering
def _all_gather_object(obj: Any) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * world().world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def agree(work: Callable[[], T]) -> T:
    """Run ``work`` on every rank; if it raised a ZsadError on any rank, raise the first such error
    on every rank (so the job ends with one message, printed by rank 0, and its exit code)."""
    if not _ensure_group():
        return work()
    failure: ZsadError | None = None
    value: Any = None
    try:
        value = work()
    except ZsadError as exc:
        failure = exc
    reports = _all_gather_object(None if failure is None else (failure.exit_code, failure.message, failure.hint))
    first = next((r for r in reports if r is not None), None)
    if first is not None:
        if failure is not None and reports.index(first) == world().rank:
            raise failure
        error = ZsadError(first[1], hint=first[2])
        error.exit_code = first[0]
        raise error
    return value


def from_writer(produce: Callable[[], T]) -> T:
    """``produce()`` run on rank 0 only and its value (or its ZsadError) given to every rank:
    for decisions that must be the same everywhere, e.g. whether a run folder may be written."""
    if not _ensure_group():
        return produce()
    import torch.distributed as dist

    box: list[Any] = [None]
    if is_writer():
        try:
            box[0] = ("ok", produce())
        except ZsadError as exc:
            box[0] = ("error", (exc.exit_code, exc.message, exc.hint))
    dist.broadcast_object_list(box, src=0)
    kind, payload = box[0]
    if kind == "error":
        error = ZsadError(payload[1], hint=payload[2])
        error.exit_code = payload[0]
        raise error
    return payload


def share(value: T) -> T:
    """Rank 0's ``value`` on every rank (small objects: results, not maps)."""
    return from_writer(lambda: value)


def barrier() -> None:
    if _ensure_group():
        import torch.distributed as dist

        dist.barrier()


def gather_tensors(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Each rank's tensors (same keys; concatenated along dim 0) on rank 0, in rank order; None on
    the other ranks. Host tensors over gloo, one collective per key: gather one class at a time."""
    if not _ensure_group():
        return local
    import torch
    import torch.distributed as dist

    here = world()
    shapes = _all_gather_object({k: (tuple(v.shape), v.dtype) for k, v in local.items()})
    out: dict[str, torch.Tensor] = {}
    for key, tensor in local.items():
        sizes = [s[key][0][0] if s[key][0] else 0 for s in shapes]
        reference = next((s[key] for s in shapes if s[key][0] and s[key][0][0] > 0), shapes[here.rank][key])
        rest, dtype = reference[0][1:], reference[1]
        wire_dtype = torch.uint8 if dtype == torch.bool else dtype  # gloo moves no bool
        longest = max(max(sizes), 1)
        buffer = torch.zeros((longest, *rest), dtype=wire_dtype)
        if tensor.numel():
            buffer[:tensor.shape[0]] = tensor.detach().cpu().to(wire_dtype)
        receive = [torch.empty_like(buffer) for _ in range(here.world_size)] if here.is_writer else None
        dist.gather(buffer, receive, dst=0)
        if here.is_writer:
            assert receive is not None
            out[key] = torch.cat([part[:n] for part, n in zip(receive, sizes)]).to(dtype)
    return out if here.is_writer else None


def in_input_order(indexed: Iterable[tuple[int, T]]) -> Iterator[T]:
    """Records made by every rank, yielded on rank 0 in input order (nothing elsewhere). A plain
    run streams them as they come; a sharded one yields once every rank has finished its share."""
    if not _ensure_group():
        for _, record in indexed:
            yield record
        return
    mine = list(indexed)
    everyone = _all_gather_object(mine)
    if is_writer():
        for _, record in sorted((pair for part in everyone for pair in part), key=lambda pair: pair[0]):
            yield record


def reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (every rank passes the same keys)."""
    if not _ensure_group():
        return values
    everyone = _all_gather_object(values)
    return {k: sum(v[k] for v in everyone) / len(everyone) for k in values}


def data_parallel(method: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel over ``method``'s trainable parameters only: the frozen backbone
    (``backbone.*``) is neither broadcast at the start nor reduced after backward. Start state is
    rank 0's; gradients are averaged over ranks."""
    from torch.nn.parallel import DistributedDataParallel

    _ensure_group()
    frozen = [name for name, p in method.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in method.named_buffers() if name.startswith("backbone.")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(method, frozen)
    # Some prompt parameters receive gradients through views (non-contiguous); DDP copies them into
    # its buckets and warns once per rank about the copy. It is a speed hint, not an error.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    device = next(method.parameters()).device
    return DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def check_global_batch(batch_size: int, *, given: bool) -> None:
    """DDP keeps the global batch: each of the W ranks takes batch_size / W, so W must divide it."""
    size = world().world_size
    if batch_size % size:
        from zsadcli.errors import BadInput

        what = f"--batch-size {batch_size}" if given else f"the recipe's batch of {batch_size}"
        raise BadInput(f"{what} cannot be split evenly over {size} processes.",
                       hint=f"pass --batch-size with a multiple of {size} (the global batch), or change --nproc-per-node")
