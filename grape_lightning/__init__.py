"""grape-lightning: reinforcement-learning post-training of language models as Lightning modules."""

from grape_lightning import strategies  # noqa: F401  registers --trainer.strategy fsdp2

__version__ = "0.1.0"
