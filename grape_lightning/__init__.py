"""grape-lightning: reinforcement-learning post-training of language models as Lightning modules."""

__version__ = "0.1.0"
