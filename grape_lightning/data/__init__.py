"""Built-in tasks, user JSONL data and the DataModules."""

from grape_lightning.data.preference import PreferenceDataModule
from grape_lightning.data.sft import SFTDataModule

__all__ = ["PreferenceDataModule", "SFTDataModule"]
