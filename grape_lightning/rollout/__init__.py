"""Generation and rollout data: the engine interface, the reference and static-cache engines, prompt batches."""

from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.datamodule import RolloutDataModule
from grape_lightning.rollout.dynamic_sampling import DynamicSamplingConfig
from grape_lightning.rollout.engine import Generation, GenerationEngine
from grape_lightning.rollout.kv_cache_engine import KVCacheEngine
from grape_lightning.rollout.sampling import SamplingParams
from grape_lightning.rollout.static_cache_engine import StaticCacheEngine, build_engine

__all__ = ["DynamicSamplingConfig", "Generation", "GenerationEngine", "KVCacheEngine", "Rollout", "RolloutDataModule", "SamplingParams", "StaticCacheEngine", "build_engine"]
