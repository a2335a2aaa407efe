"""Reading a run's TensorBoard logs back: the scalars it logged, by tag and step."""

from __future__ import annotations

from pathlib import Path


def read_scalars(run_dir: str | Path, prefix: str = "") -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalars whose tag starts with ``prefix``, from every event file
    directly in ``run_dir`` (a resumed run's too; a step logged twice keeps its last value)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    events.Reload()
    return {
        tag: {event.step: float(event.value) for event in events.Scalars(tag)}
        for tag in events.Tags()[SCALARS] if tag.startswith(prefix)
    }
