"""``FSDP2Strategy``, registered as ``--trainer.strategy fsdp2``: FSDP2 data parallelism over every device.

Lightning's ``fsdp`` is FSDP1, which wraps the LightningModule in one root unit and runs
``training_step`` inside its forward; a backward there (manual optimisation: every on-policy
algorithm) fails. FSDP2 (``fully_shard``) runs in Lightning as ``ModelParallelStrategy``, whose
defaults give the devices of a node to tensor parallelism; grape_lightning has no tensor-parallel
plans, so this strategy shards over every device of every node (``tensor_parallel_size=1``) in
the units of :mod:`grape_lightning.models.sharding`.

Checkpoints are whole by default (gathered on rank 0 and written through the checkpoint IO,
atomically with the CLI's default), so they load on any number of devices and under any
strategy. For models whose full state does not fit one process's memory, set
``save_distributed_checkpoint=True`` (one shard per rank, read back on any number of ranks).

Importing :mod:`grape_lightning` registers the name.
"""

from __future__ import annotations

from datetime import timedelta

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with every device in the data-parallel dimension."""

    def __init__(
        self,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend, timeout=timeout,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # known once the devices are
        super().setup_environment()


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register(
        "fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) data parallelism over every device"
    )
