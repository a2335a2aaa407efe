"""The forward pass of a Llama-family causal LM over a preallocated KV cache, one decode step
capturable as a CUDA graph.

Generation in Hugging Face models spends most of its time launching small kernels from Python:
at batch 64 a 0.5B model's decode step is about a millisecond of GPU work, spread over hundreds of
launches. Here the cache is allocated once ([batch, kv_heads, length, head_dim] per layer, column s
of the generation layout in slot s) and every decode step reads and writes the same tensors, so
the whole step (embedding, all layers, LM head) can be recorded once and replayed as a graph.

The model's own modules do the work (projections, norms, MLP, rotary embedding, LM head), so
their weights are used in place: a training step that updates them in place is seen by the next
replay. Only attention is written here: Llama, Mistral, Qwen2 and Qwen3 share it (grouped-query
attention with rotary positions; Qwen3 adds a per-head norm of queries and keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grape_lightning.models.logprobs import positions_from_mask

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GRAPH_SAFE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # no position-dependent recomputation


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The Hugging Face ``*ForCausalLM`` inside ``model`` (a peft wrapper is looked through)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def unsupported_reason(model: nn.Module, length: int) -> str | None:
    """Why :class:`StaticCacheDecoder` cannot run ``model`` for ``length`` slots, or None if it can."""
    lm = causal_lm_of(model)
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    body = getattr(lm, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb") or not hasattr(lm, "lm_head"):
        return "the model does not have the Llama layout (model.layers, model.rotary_emb, lm_head)"
    rope_type = getattr(body.rotary_emb, "rope_type", "default")
    if rope_type not in GRAPH_SAFE_ROPE_TYPES:
        return f"rope type {rope_type!r} recomputes its frequencies with the position"
    for layer in body.layers:
        window = getattr(layer.self_attn, "sliding_window", None)
        if window is not None and window < length:
            return f"sliding-window attention ({window} < {length} slots)"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        return "logit soft-capping"
    return None


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotary position embedding in the half-split convention of Hugging Face's Llama family,

        x cos + rotate_half(x) sin,   rotate_half(x) = (-x2, x1) = roll(x, d/2) * (-1, +1),

    computed as x cos + roll(x, d/2) signed_sin with ``signed_sin = (-sin1, sin2)`` (see
    :func:`signed_sin`, made once a step for every layer): the same products, exactly, in one
    kernel fewer than negating and concatenating the halves in each layer."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def signed_sin(sin: Tensor) -> Tensor:
    """(-sin1, sin2): the sine with the sign of rotate_half folded in (see :func:`rotate`)."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rms_norm(module: nn.Module, x: Tensor) -> Tensor:
    """A Llama-family RMSNorm module applied as one fused kernel (its own forward takes seven).

    The module's forward normalises in float32 whatever the input; float64 inputs (used to check
    this decoder against the model exactly) therefore go through it unchanged."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is None or getattr(module, "weight", None) is None or x.dtype == torch.float64:
        return module(x)
    return F.rms_norm(x, (x.shape[-1],), module.weight, eps)


class StaticCacheDecoder:
    """Prefill and decode for ``batch`` rows over ``length`` cache slots.

    :meth:`prefill` runs the prompts ([batch, width], left-padded, positioned by their mask) and
    fills slots [0, width); :meth:`decode` feeds one token per row into slot ``slot``.
    :meth:`capture` records :meth:`decode`'s work as a CUDA graph that later calls replay.
    A slot is attended to once written with a real token (prompt padding never is); every row
    writes every slot, a stopped row's tokens being padding that no caller scores.
    """

    def __init__(self, model: nn.Module, batch: int, length: int) -> None:
        self.lm = causal_lm_of(model)
        self.body = self.lm.model
        self.layers = list(self.body.layers)
        config = self.lm.config.get_text_config()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        weight = self.body.embed_tokens.weight
        self.batch, self.length, self.dtype, self.device = batch, length, weight.dtype, weight.device
        shape = (batch, self.num_kv_heads, length, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.slot_valid = torch.zeros(batch, length, dtype=torch.bool, device=self.device)
        # the decode step's inputs live in fixed tensors, so that a captured graph reads them
        self.tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: Tensor | None = None
        self.weights_fingerprint = weights_fingerprint(model)
        self._fuse_projections()
        self._step = self._decode_step

    # -- weights --------------------------------------------------------------------------------
    def refresh_weights(self) -> None:
        """Copy the current query/key/value weights into the fused projections (in place, so a
        recorded graph reads the new values). Call after the model's weights changed."""
        with torch.no_grad():
            for layer, weight, bias in zip(self.layers, self.qkv_weights, self.qkv_biases):
                attention = layer.self_attn
                torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight], out=weight)
                if bias is not None:
                    torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias], out=bias)

    def _fuse_projections(self) -> None:
        # One matrix product for queries, keys and values instead of three (a decode step is
        # bound by the number of kernels it launches). Only for plain linear layers: an adapter
        # (LoRA) wraps them, and its layers are then called one by one.
        self.fused = all(type(getattr(layer.self_attn, name)) is nn.Linear for layer in self.layers for name in ("q_proj", "k_proj", "v_proj"))
        self.qkv_weights: list[Tensor] = []
        self.qkv_biases: list[Tensor | None] = []
        if not self.fused:
            return
        for layer in self.layers:
            attention = layer.self_attn
            rows = sum(getattr(attention, name).out_features for name in ("q_proj", "k_proj", "v_proj"))
            self.qkv_weights.append(attention.q_proj.weight.new_empty(rows, attention.q_proj.in_features))
            self.qkv_biases.append(attention.q_proj.bias.new_empty(rows) if attention.q_proj.bias is not None else None)
        self.refresh_weights()

    # -- attention -----------------------------------------------------------------------------
    def _project(self, index: int, layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries [batch, time, heads, head_dim], rotated keys and values [batch, time, kv_heads, head_dim]."""
        attention = layer.self_attn
        batch, time, _ = hidden.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        if self.fused:
            qkv = F.linear(hidden, self.qkv_weights[index], self.qkv_biases[index]).view(batch, time, heads + 2 * kv_heads, self.head_dim)
            queries_keys, values = qkv[:, :, : heads + kv_heads], qkv[:, :, heads + kv_heads :]
        else:
            queries_keys = torch.cat([
                attention.q_proj(hidden).view(batch, time, heads, self.head_dim),
                attention.k_proj(hidden).view(batch, time, kv_heads, self.head_dim),
            ], dim=2)
            values = attention.v_proj(hidden).view(batch, time, kv_heads, self.head_dim)
        if hasattr(attention, "q_norm"):  # Qwen3: RMS norm of each head's query and key
            queries_keys = torch.cat([rms_norm(attention.q_norm, queries_keys[:, :, :heads]),
                                      rms_norm(attention.k_norm, queries_keys[:, :, heads:])], dim=2)
        queries_keys = rotate(queries_keys, cos[:, :, None], sin[:, :, None])  # queries and keys in one pass (sin: signed)
        return queries_keys[:, :, :heads], queries_keys[:, :, heads:], values

    def _scale(self, layer: nn.Module) -> float:
        return getattr(layer.self_attn, "scaling", self.head_dim**-0.5)

    def _prefill_attention(self, index: int, layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        queries, keys, values = (x.transpose(1, 2) for x in self._project(index, layer, hidden, cos, sin))
        width = hidden.shape[1]
        self.keys[index][:, :, :width] = keys
        self.values[index][:, :, :width] = values
        groups = self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(
            queries, keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1),
            attn_mask=mask, scale=self._scale(layer),
        )
        return layer.self_attn.o_proj(out.transpose(1, 2).reshape(hidden.shape[0], width, -1))

    def _decode_attention(self, index: int, layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        queries, keys, values = self._project(index, layer, hidden, cos, sin)
        self.keys[index].index_copy_(2, self.slot, keys.transpose(1, 2))
        self.values[index].index_copy_(2, self.slot, values.transpose(1, 2))
        # grouped-query attention without repeating the cache: the query heads that share a KV
        # head (consecutive, as Hugging Face orders them) become that head's query rows
        batch = hidden.shape[0]
        grouped = queries.reshape(batch, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(grouped, self.keys[index], self.values[index], attn_mask=mask, scale=self._scale(layer))
        return layer.self_attn.o_proj(out.reshape(batch, 1, self.num_heads * self.head_dim))

    # -- the passes ----------------------------------------------------------------------------
    def _layers(self, hidden: Tensor, positions: Tensor, attend) -> Tensor:
        cos, sin = self.body.rotary_emb(hidden, positions)
        sin = signed_sin(sin)
        for index, layer in enumerate(self.layers):
            hidden = hidden + attend(index, layer, rms_norm(layer.input_layernorm, hidden), cos, sin)
            hidden = hidden + layer.mlp(rms_norm(layer.post_attention_layernorm, hidden))
        return self._logits(rms_norm(self.body.norm, hidden[:, -1]))

    # The embedding and the LM head are applied to their weights, not called as modules: they may be
    # FSDP2 units (tied, one grouped unit), whose hooks expect a training forward; generation holds
    # their parameters gathered already (``full_parameters``).
    def _embed(self, token_ids: Tensor) -> Tensor:
        embedding = self.body.embed_tokens
        return F.embedding(token_ids, embedding.weight) if isinstance(embedding, nn.Embedding) else embedding(token_ids)

    def _logits(self, hidden: Tensor) -> Tensor:
        head = self.lm.lm_head
        return F.linear(hidden, head.weight, head.bias) if isinstance(head, nn.Linear) else head(hidden)

    def prefill(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits [batch, vocab] after each prompt; fills the cache's first ``width`` slots."""
        width = input_ids.shape[1]
        real = attention_mask.bool()
        self.slot_valid.zero_()
        self.slot_valid[:, :width] = real
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        # a padding position attends to itself only: its output is never used, but must not be NaN
        mask = (causal & real[:, None, None, :]) | torch.eye(width, dtype=torch.bool, device=self.device)
        hidden = self._embed(input_ids)
        return self._layers(
            hidden, positions_from_mask(attention_mask),
            lambda i, layer, h, cos, sin: self._prefill_attention(i, layer, h, cos, sin, mask),
        )

    def _decode_step(self) -> Tensor:
        self.slot_valid.index_fill_(1, self.slot, True)
        # additive, built once per step for every layer (a boolean mask is converted in each call)
        mask = torch.zeros(self.slot_valid.shape, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill_(~self.slot_valid, float("-inf"))[:, None, None, :]
        hidden = self._embed(self.tokens[:, None])
        return self._layers(
            hidden, self.positions[:, None],
            lambda i, layer, h, cos, sin: self._decode_attention(i, layer, h, cos, sin, mask),
        )

    def step(self) -> Tensor:
        """Logits [batch, vocab] after feeding :attr:`tokens` at :attr:`positions` into cache slot
        :attr:`slot` (the fixed input tensors, which a recorded graph reads)."""
        return self._step()

    def decode(self, tokens: Tensor, positions: Tensor, slot: int) -> Tensor:
        """Logits [batch, vocab] after feeding ``tokens`` at ``positions`` into cache slot ``slot``."""
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.slot.fill_(slot)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.graph_logits  # type: ignore[return-value]

    def compile(self) -> None:
        """Compile the decode step with ``torch.compile`` (elementwise work fused into fewer
        kernels; the first call of each shape pays the compilation)."""
        self._step = torch.compile(self._decode_step, dynamic=False)

    def capture(self, pool: object | None = None) -> None:
        """Record one decode step as a CUDA graph (before :meth:`prefill`: warming up writes a slot)."""
        self.graph, self.graph_logits = self.record(self._step, pool)

    def record(self, step, pool: object | None = None, generator: torch.Generator | None = None):
        """Record ``step()`` (a decode step and what follows it) as a CUDA graph; returns (graph,
        its output). ``generator``: a CUDA generator that ``step`` draws from, registered with the
        graph so that each replay draws fresh numbers from its current state (the default
        generator always is). Call before :meth:`prefill`: warming up writes a cache slot."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # kernels choose their algorithms and allocate workspaces outside the graph
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            graph.register_generator_state(generator)
        # thread_local: other threads of the process (pinned-memory data loading, the NCCL watchdog)
        # keep making CUDA calls during the capture, which the default global mode would fail on
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            output = step()
        return graph, output


def weights_fingerprint(model: nn.Module) -> tuple[int, ...]:
    """Where the weights live: a graph replays reads from these addresses, so it is valid only while
    they stay (in-place optimizer steps keep them; moving or re-gathering the model does not)."""
    return tuple(parameter.data_ptr() for parameter in model.parameters())
