"""FSDP2 (``fully_shard``) for Lightning's ``ModelParallelStrategy``: the units each model is sharded in.

Lightning's ``FSDPStrategy`` (FSDP1) wraps the whole LightningModule as one root unit and runs
``training_step`` inside that unit's forward; a backward inside the step (manual optimisation:
every on-policy algorithm) then meets the root in its forward state and fails. FSDP2 has no such
root: hooks sit on the sharded submodules, so forward and backward may interleave freely.

Units, chosen for how the algorithms call the models (the trunk, ``model.base_model``, and the
LM head, ``model.get_output_embeddings()``, are called separately to compute log-probs without
[batch, time, vocab] logits): every decoder layer; the trunk (embeddings and final norm); the LM
head, which stays gathered from its first forward to the backward, so that calls over further
chunks of response tokens (a number that differs between ranks) gather nothing; a value head.
Parameters left in no unit would be neither sharded nor synchronised, so every trained parameter
goes into a unit. Tied input and output embeddings (one matrix, e.g. Qwen2.5 up to 3B) make one unit
of the two modules: gathered at the embedding's forward, kept gathered to the backward (like an
untied head), so the head's calls find it whole and the two gradients reach one reduce-scatter.
"""

from __future__ import annotations

from torch import nn


def decoder_layers(trunk: nn.Module) -> list[nn.Module]:
    for name in ("layers", "h", "blocks"):
        layers = getattr(trunk, name, None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    raise ValueError(f"no decoder layer list found in {type(trunk).__name__} (looked for .layers, .h, .blocks)")


def shard_causal_lm(model: nn.Module, mesh) -> None:
    """``fully_shard`` the decoder layers, the trunk and the LM head of a Hugging Face causal LM
    (the head and the input embedding as one unit when they share their matrix)."""
    from torch.distributed.fsdp import fully_shard

    trunk = model.base_model
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    for layer in decoder_layers(trunk):
        fully_shard(layer, mesh=mesh)
    if head is not None and head.weight is embedding.weight:
        fully_shard([embedding, head], mesh=mesh, reshard_after_forward=False)
    fully_shard(trunk, mesh=mesh)
    if head is not None and head.weight is not embedding.weight:
        fully_shard(head, mesh=mesh, reshard_after_forward=False)


def shard_value_model(value_model: nn.Module, mesh, trunk_sharded: bool) -> None:
    """The value model's head, and its trunk unless it is the policy's (sharded already)."""
    from torch.distributed.fsdp import fully_shard

    if not trunk_sharded:
        trunk = value_model.trunk
        for layer in decoder_layers(trunk):
            fully_shard(layer, mesh=mesh)
        fully_shard(trunk, mesh=mesh)
    fully_shard(value_model.head, mesh=mesh)


def shard_sequence_scorer(model: nn.Module, mesh) -> None:
    """A sequence-classification model (reward model): its decoder layers, trunk and score head."""
    from torch.distributed.fsdp import fully_shard

    trunk = model.base_model
    for layer in decoder_layers(trunk):
        fully_shard(layer, mesh=mesh)
    fully_shard(trunk, mesh=mesh)
    fully_shard(model.score, mesh=mesh)
