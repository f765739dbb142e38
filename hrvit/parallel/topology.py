"""Sequence-parallel (SP) x data-parallel (DP) layout of the ranks, and the mpu DeepSpeed takes.

SP groups are runs of consecutive ranks ([0, 1], [2, 3], ... for sp_size 2), so on a node the
ranks that exchange activations in every attention layer are neighbours. Data-parallel rank =
rank // sp_size: the ranks of one SP group read the same samples. Within an SP group of U x R
ranks (Ulysses degree U, ring degree R), the Ulysses groups are runs of U consecutive ranks (their
all-to-all moves the most data, so it stays closest) and each ring group takes the ranks with the
same place in their Ulysses group (stride U).
"""

from __future__ import annotations

import torch.distributed as dist

from hrvit.errors import ConfigError


def check_heads(sp_size: int, ring: int, num_heads: int | None) -> None:
    """Raise ConfigError unless sp_size = Ulysses degree x `ring` with a Ulysses degree that divides the heads."""
    if ring < 1 or sp_size % ring:
        raise ConfigError(f"parallel.ring: {ring} does not divide parallel.sp_size: {sp_size} "
                          "(sp_size = Ulysses degree x ring degree)")
    ulysses = sp_size // ring
    if num_heads is not None and num_heads % ulysses:
        fits = next(r for r in range(ring, sp_size + 1) if sp_size % r == 0 and num_heads % (sp_size // r) == 0)
        where = f"parallel.sp_size: {sp_size}" if ring == 1 else \
            f"parallel.sp_size: {sp_size} / parallel.ring: {ring} = Ulysses degree {ulysses}"
        raise ConfigError(f"{where} does not divide the model's {num_heads} attention heads (Ulysses gives each "
                          f"rank of a group whole heads); set parallel.ring={fits} (ring attention has no head "
                          "limit) or choose an SP size that divides the heads")


def check_parallel(sp_size: int, world: int, num_heads: int | None = None, ring: int = 1) -> None:
    """Raise ConfigError when the launched ranks or the model's heads cannot be split into SP groups."""
    check_heads(sp_size, ring, num_heads)
    if sp_size > world:
        raise ConfigError(f"parallel.sp_size: {sp_size} needs at least {sp_size} ranks, but {world} "
                          f"{'was' if world == 1 else 'were'} launched")
    if world % sp_size:
        raise ConfigError(f"parallel.sp_size: {sp_size} does not divide the {world} launched ranks")


def grad_sum_factor(ds_config: dict, sp_size: int) -> int:
    """What each SP rank multiplies its share of the loss by so that DeepSpeed's reduction gives the
    true gradient (measured on DeepSpeed 0.19.8 with this mpu, and tested in tests/test_parallel.py):
    ZeRO 0-2 divide the sum over all ranks by the DP size (a sum over SP ranks), ZeRO-3's
    reduce-scatter divides it by the world size (an average over SP ranks too)."""
    zero = ds_config.get("zero_optimization", {})
    if int(zero.get("stage", 0)) != 3 or sp_size == 1:
        return 1
    if not zero.get("reduce_scatter", True):
        # its all-reduce path divides by the DP size or the world size depending on bucket size
        raise ConfigError("deepspeed: zero_optimization.reduce_scatter=false with ZeRO-3 scales gradients "
                          "inconsistently under sequence parallelism; leave it true or use parallel.sp_size=1")
    return sp_size


class SequenceParallel:
    """This rank's SP group and place in the SP x DP layout, and the `mpu` deepspeed.initialize takes.

    Create it on every rank at the same point (group creation is collective). DeepSpeed reads an
    mpu that has `initialize_sequence_parallel` as "sequence parallel, no tensor parallel": ZeRO
    then shards and reduces over all ranks and keeps SP replicas in sync (its config key
    `sequence_parallel_size` does not, under ZeRO 0-2). Model parallelism is reported as one rank
    (a group of this rank alone), so gradient-norm sums are not repeated over SP ranks.

    Deliberately no get_data_parallel_group/_world_size: ZeRO-3 partitions parameters (and reduces
    their gradients) over the mpu's data-parallel group when it has one, which would leave SP
    ranks unreduced; without it DeepSpeed uses all ranks and takes world / sp as the DP size.
    """

    def __init__(self, sp_size: int, ring: int = 1):
        self.size, self.ring, self.ulysses = sp_size, ring, sp_size // ring
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        check_parallel(sp_size, self.world, ring=ring)
        self.sp_rank, self.dp_rank, self.dp_size = self.rank % sp_size, self.rank // sp_size, self.world // sp_size
        self.ulysses_group = self.ring_group = None
        for first in range(0, self.world, sp_size):
            ranks = list(range(first, first + sp_size))
            group = dist.new_group(ranks)
            mine = self.rank in ranks
            if mine:
                self.group = group
            # Ulysses and ring sub-groups (None for a degree of 1); every rank creates every group in the same order
            if self.ulysses > 1:
                subs = [ranks[u:u + self.ulysses] for u in range(0, sp_size, self.ulysses)]
                self._pick("ulysses_group", subs, group if ring == 1 else None, mine)
            if ring > 1:
                subs = [ranks[r::self.ulysses] for r in range(self.ulysses)]
                self._pick("ring_group", subs, group if self.ulysses == 1 else None, mine)
        self.all_group = dist.new_group(list(range(self.world)))
        self.self_group = dist.new_group([self.rank], use_local_synchronization=True)

    def _pick(self, name: str, subs: list[list[int]], whole, mine: bool) -> None:
        """Create the groups `subs` (or use `whole`, the SP group, when there is one sub-group) and keep ours."""
        for ranks in subs:
            group = whole if whole is not None else dist.new_group(ranks)
            if mine and self.rank in ranks:
                setattr(self, name, group)

    # --- what DeepSpeed 0.19.8 calls on an mpu (deepspeed/utils/groups.py, runtime/config.py, engine.py)
    def initialize_sequence_parallel(self, *_):
        """Marker DeepSpeed tests with hasattr(); the groups already exist."""

    def get_sequence_parallel_group(self):
        return self.group

    def get_sequence_parallel_rank(self) -> int:
        return self.sp_rank

    def get_sequence_parallel_world_size(self) -> int:
        return self.size

    def get_sequence_data_parallel_group(self):
        return self.all_group

    def get_sequence_data_parallel_rank(self) -> int:
        return self.rank

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.world

    def get_model_parallel_group(self):
        return self.self_group

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1
