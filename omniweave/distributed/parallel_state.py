"""ParallelState: the one device mesh, its named axes and the groups derived from it.

Axes, outermost first: ``pp`` (pipeline stages), ``dp_replicate`` (HSDP replicas),
``dp_shard`` (FSDP shards), ``cp`` (ring context parallel), ``sp`` (Ulysses sequence
parallel), ``tp`` (tensor parallel). ``dp_shard`` is always materialised; the others only
when their degree exceeds 1. ``tp`` is innermost: its collectives run in every block, so its
ranks are adjacent (one node, fastest links). ``pp`` is outermost: a stage only sends one
activation per micro-batch to the next, the least traffic of all, so it can cross nodes.
``ep`` is not a mesh axis of its own: expert-parallel groups are carved out of the FSDP
ranks (``dp_shard x cp x sp``).
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class Degrees:
    """Resolved parallel degrees; their product (without ``ep``) is the world size."""

    dp_replicate: int
    dp_shard: int
    sp: int
    ep: int
    tp: int = 1
    cp: int = 1
    pp: int = 1

    @property
    def fsdp(self) -> int:
        """Ranks one parameter is sharded over: context- and sequence-parallel ranks shard too."""
        return self.dp_shard * self.cp * self.sp

    @property
    def sequence(self) -> int:
        """Ranks one row is split over (ring across ``cp``, Ulysses inside it)."""
        return self.cp * self.sp

    @property
    def row_multiple(self) -> int:
        """What every row's length must divide by: its splits over cp (two chunks per rank,
        for balance), sp and tp."""
        return (2 * self.cp if self.cp > 1 else 1) * self.sp * self.tp

    @property
    def dp(self) -> int:
        """Ranks that read different samples."""
        return self.dp_replicate * self.dp_shard


def resolve_degrees(
    world_size: int,
    dp_replicate: int = 1,
    dp_shard: int = -1,
    sp: int = 1,
    ep: int = 1,
    tp: int = 1,
    cp: int = 1,
    pp: int = 1,
) -> Degrees:
    """Fill in ``dp_shard=-1`` and check every degree; raise ValueError saying what to change."""
    named = {"dp_replicate": dp_replicate, "sp": sp, "ep": ep, "tp": tp, "cp": cp, "pp": pp}
    for name, value in named.items():
        if value < 1:
            raise ValueError(f"parallel.{name}={value}: degrees must be >= 1.")
    if dp_shard == -1:
        fixed = pp * dp_replicate * cp * sp * tp
        if world_size % fixed:
            raise ValueError(
                f"parallel.pp x dp_replicate x cp x sp x tp = {pp} x {dp_replicate} x {cp} x "
                f"{sp} x {tp} = "
                f"{fixed} does not divide the world size {world_size}; choose degrees whose "
                f"product divides {world_size} (or change the number of processes)."
            )
        dp_shard = world_size // fixed
    elif dp_shard < 1:
        raise ValueError(f"parallel.dp_shard={dp_shard}: use a degree >= 1, or -1 for the rest.")
    product = pp * dp_replicate * dp_shard * cp * sp * tp
    if product != world_size:
        raise ValueError(
            f"parallel.pp x dp_replicate x dp_shard x cp x sp x tp = {pp} x {dp_replicate} x "
            f"{dp_shard} x {cp} x {sp} x {tp} = {product}, but {world_size} processes are "
            f"running; make the product equal the number of processes (start {product} with "
            f"--nproc {product} or torchrun), or set parallel.dp_shard=-1 to use whatever is left."
        )

    if pp > 1 and ep > 1:
        raise ValueError(
            f"parallel.pp={pp} composes with dp_shard, dp_replicate, tp, cp and sp, not yet "
            "with expert parallelism; use parallel.ep=1 with it."
        )
    degrees = Degrees(dp_replicate, dp_shard, sp, ep, tp, cp, pp)
    if degrees.fsdp % ep:
        raise ValueError(
            f"parallel.ep={ep} must divide the FSDP ranks dp_shard x sp = {degrees.fsdp}; "
            f"choose an ep among the divisors of {degrees.fsdp}."
        )
    if ep > 1 and dp_replicate > 1:
        raise ValueError(
            f"parallel.ep={ep} with parallel.dp_replicate={dp_replicate} (HSDP) is not supported "
            "yet; use dp_replicate=1 with expert parallelism."
        )
    return degrees


def device_for_rank(local_rank: int) -> torch.device:
    """The CUDA device of this local rank where CUDA exists, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(timeout_s: float = 600.0) -> None:
    """Join the job started by torchrun, or form a 1-process group when run directly."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if "RANK" not in os.environ:  # an in-memory store: no port to pick, none to lose in a race
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend, timeout=timeout)
        return
    # Restarted workers meet in the store of the first attempt, whose keys (the dead
    # workers' addresses) would be read as theirs: give each attempt its own key space.
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
        timeout=timeout,
    )
    store = dist.PrefixStore(f"omniweave/attempt_{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def describe_timeout(error: BaseException) -> str | None:
    """For a collective that timed out (gloo says only "recv"), which torch.distributed
    operation it was and where OmniWeave called it; None for any other error."""
    if "timed out" not in str(error).lower():
        return None
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if f"{os.sep}omniweave{os.sep}" in f.filename]
    theirs = [f for f in frames if f"{os.sep}torch{os.sep}distributed{os.sep}" in f.filename]
    operation = theirs[-1].name if theirs else "a collective"
    if ours:
        operation += f" (called from {ours[-1].filename}:{ours[-1].lineno} in {ours[-1].name})"
    return operation


class ParallelState:
    """Owns the device mesh and answers 'which ranks do X with me?'."""

    def __init__(self, degrees: Degrees, device: torch.device):
        self.degrees = degrees
        self.device = device
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        axes = [("pp", degrees.pp), ("dp_replicate", degrees.dp_replicate)]
        axes += [("dp_shard", degrees.dp_shard)]
        axes += [("cp", degrees.cp), ("sp", degrees.sp), ("tp", degrees.tp)]
        axes = [(name, size) for name, size in axes if size > 1 or name == "dp_shard"]
        self.mesh: DeviceMesh = init_device_mesh(
            device.type,
            tuple(size for _, size in axes),
            mesh_dim_names=tuple(name for name, _ in axes),
        )
        self._axes = [name for name, _ in axes]
        self.fsdp_mesh = self._flat(("dp_shard", "cp", "sp"), "fsdp")
        self.dp_mesh = self._flat(("dp_replicate", "dp_shard"), "dp")
        self.loss_mesh = self._flat(("dp_replicate", "dp_shard", "cp", "sp"), "loss")
        # every rank that holds different tokens: tp ranks split the sequence outside attention
        self.token_mesh = self._flat(("dp_replicate", "dp_shard", "cp", "sp", "tp"), "tokens")
        self.ep_mesh: DeviceMesh | None = None
        self.expert_fsdp_mesh: DeviceMesh | None = None
        if degrees.ep > 1:  # the FSDP ranks as (efsdp, ep): an EP group is ep adjacent ranks
            experts = self.fsdp_mesh._unflatten(
                0, (degrees.fsdp // degrees.ep, degrees.ep), ("efsdp", "ep")
            )
            self.ep_mesh, self.expert_fsdp_mesh = experts["ep"], experts["efsdp"]

    def _flat(self, names: tuple[str, ...], flat_name: str) -> DeviceMesh:
        present = tuple(name for name in names if name in self._axes)
        if len(present) == 1:
            return self.mesh[present[0]]
        return self.mesh[present]._flatten(flat_name)

    @property
    def sharding_mesh(self) -> DeviceMesh:
        """Mesh FSDP2 shards on: 1-D (FSDP) or 2-D ``(dp_replicate, fsdp)`` (HSDP)."""
        if self.degrees.dp_replicate == 1:
            return self.fsdp_mesh
        fsdp_name = self.fsdp_mesh.mesh_dim_names[0]
        return self.mesh["dp_replicate", fsdp_name]

    @property
    def dp_rank(self) -> int:
        """Index of this rank's sample stream (sequence-parallel peers share it)."""
        return self.dp_mesh.get_local_rank()

    @property
    def expert_sharding_mesh(self) -> DeviceMesh:
        """Mesh FSDP2 shards expert weights on: the FSDP ranks holding the same experts."""
        return self.sharding_mesh if self.degrees.ep == 1 else self.expert_fsdp_mesh

    def _axis(self, name: str) -> DeviceMesh | None:
        """The 1-D mesh of axis ``name``; None when its degree is 1 (not materialised)."""
        return self.mesh[name] if getattr(self.degrees, name) > 1 else None

    def _group(self, name: str) -> dist.ProcessGroup | None:
        axis = self._axis(name)
        return None if axis is None else axis.get_group()

    def _rank(self, name: str) -> int:
        axis = self._axis(name)
        return 0 if axis is None else axis.get_local_rank()

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        """The ranks of one attention ring (None without context parallelism)."""
        return self._group("cp")

    @property
    def cp_rank(self) -> int:
        """Which two chunks of each row this rank holds."""
        return self._rank("cp")

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        """The ranks of one pipeline, a stage each (None without pipeline parallelism)."""
        return self._group("pp")

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage."""
        return self._rank("pp")

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        """The ranks that split each layer's weights (None without tensor parallelism)."""
        return self._axis("tp")

    @property
    def tp_rank(self) -> int:
        """Which share of each layer's weights (and, outside attention, of each row) it holds."""
        return self._rank("tp")

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        """The ranks that split one sequence (None without sequence parallelism)."""
        return self._group("sp")

    @property
    def sp_rank(self) -> int:
        """Which slice of each sequence this rank holds."""
        return self._rank("sp")

    @property
    def is_distributed(self) -> bool:
        """Whether gradients are reduced across more than one rank."""
        return self.degrees.dp_replicate * self.degrees.fsdp > 1

    def describe(self) -> str:
        d = self.degrees
        named = (("cp", d.cp), ("tp", d.tp), ("pp", d.pp))
        extra = "".join(f" {name}={n}" for name, n in named if n > 1)
        return (
            f"world={self.world_size} dp_replicate={d.dp_replicate} dp_shard={d.dp_shard} "
            f"sp={d.sp} ep={d.ep}{extra} device={self.device.type}"
        )
