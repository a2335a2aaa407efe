"""Generation and rollout data: the engine interface, the reference KV-cache engine, prompt batches."""

from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.datamodule import RolloutDataModule
from grape_lightning.rollout.engine import Generation, GenerationEngine
from grape_lightning.rollout.kv_cache_engine import KVCacheEngine
from grape_lightning.rollout.sampling import SamplingParams

__all__ = ["Generation", "GenerationEngine", "KVCacheEngine", "Rollout", "RolloutDataModule", "SamplingParams"]
