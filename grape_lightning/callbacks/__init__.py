from grape_lightning.callbacks.complete_logs import CompleteLogs
from grape_lightning.callbacks.hf_export import HFExport, export_atomically
from grape_lightning.callbacks.interrupt_checkpoint import CheckpointOnInterrupt
from grape_lightning.callbacks.learning_guard import NoLearningSignalError, StopWhenNotLearning
from grape_lightning.callbacks.progress import StepProgressBar
from grape_lightning.callbacks.run_summary import RunSummary
from grape_lightning.callbacks.sample_table import SampleTable
from grape_lightning.callbacks.task_accuracy import GreedyTaskAccuracy
from grape_lightning.callbacks.throughput import TokenThroughput

__all__ = [
    "CheckpointOnInterrupt", "CompleteLogs", "GreedyTaskAccuracy", "HFExport", "NoLearningSignalError", "RunSummary", "SampleTable",
    "StepProgressBar", "StopWhenNotLearning", "TokenThroughput", "export_atomically",
]
