"""Stacked execution: M members of one architecture run as one model, sharing tokenization and one forward.

The stack computes the same function as a loop over the members (agreement to fp32 rounding is tested): the
member dimension is folded into the batch (``execution="fold"``). Every weight is stacked to ``(M, …)``; each linear
layer is one batched matmul ``baddbmm`` over ``(M, B·T, H)``; the M×B sequences go through **one**
scaled-dot-product-attention call of batch ``M·B`` (so the fused CUDA kernels apply), and the per-member LayerNorm is
a plain normalisation followed by the member's scale and shift. On CPU the linear layers run one GEMM per member into
a shared output instead (faster there than MKL's batched GEMM). Written for BERT-family encoders (``model_type``
``bert``, absolute positions, encoder only); anything else falls back to the loop. The members' own parameters become
views into the stacked tensors, so stacking costs no memory.

Members qualify for stacking when :func:`stack_incompatibility` returns ``None``: same encoder architecture
and parameter shapes, same tokenizer (identical vocabulary and normaliser), same marker scheme, window length
and head, and no FGEMR gene typer (each member's gene typer would type genes differently, so inputs would
differ per member).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from drugprot.encoding import LABELS, EncodedPair, iterate_batches, token_budget_batches
from drugprot.model.runtime import autocast

ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "hidden_act", "layer_norm_eps", "vocab_size", "max_position_embeddings", "type_vocab_size",
                     "position_embedding_type", "is_decoder", "add_cross_attention")


def _architecture(model) -> dict:
    config = model.encoder.config
    return {key: getattr(config, key, None) for key in ARCHITECTURE_KEYS}


def _tokenizer_signature(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    return json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])


def stack_incompatibility(members: Sequence) -> str | None:
    """Why these loaded members cannot run stacked, or ``None`` when they can."""
    if len(members) < 2:
        return "a single member"
    first = members[0]
    if any(m.gene_typer is not None for m in members):
        return "FGEMR members type genes with their own classifiers, so their inputs differ"
    shapes = {name: (tuple(p.shape), p.dtype) for name, p in first.model.named_parameters()}
    for member in members[1:]:
        for key, default in (("markers", None), ("max_length", None), ("system", None), ("context", "sentence")):
            if member.info.get(key, default) != first.info.get(key, default):
                return f"{key} differs ({first.info.get(key, default)!r} vs {member.info.get(key, default)!r})"
        if _architecture(member.model) != _architecture(first.model):
            return "encoder architectures differ"
        if {n: (tuple(p.shape), p.dtype) for n, p in member.model.named_parameters()} != shapes:
            return "parameter shapes differ"
        if _tokenizer_signature(member.tokenizer) != _tokenizer_signature(first.tokenizer):
            return "tokenizers differ"
        if first.model.system == "relation_attention" and not torch.equal(
                member.model.definition_ids.cpu(), first.model.definition_ids.cpu()):
            return "relation definitions were tokenized differently"
    arch = _architecture(first.model)
    if arch["model_type"] != "bert":
        return f"the fold strategy supports BERT encoders, not {arch['model_type']!r}"
    if arch["is_decoder"] or arch["add_cross_attention"] or (arch["position_embedding_type"] or "absolute") != "absolute":
        return "the fold strategy supports encoder-only BERT with absolute positions"
    return None


class FoldedRelationModel:
    """M ``RelationModel``s (BERT encoders) as one batched computation; call it like a ``RelationModel``.

    ``__call__(input_ids (B, T), attention_mask (B, T), subject (B,), obj (B,))`` returns logits ``(M, B, L)``.
    """

    def __init__(self, models: Sequence[torch.nn.Module], *, share_memory: bool = True):
        from transformers.activations import ACT2FN

        first = models[0]
        config = first.encoder.config
        self.members = len(models)
        self.system = first.system
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.layers = config.num_hidden_layers
        self.eps = config.layer_norm_eps
        self.act = ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act
        named = [dict(m.named_parameters()) for m in models]
        self.p: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name in named[0]:
                if name.startswith("entity_head."):
                    continue  # training-only head (multitask)
                stacked = torch.stack([n[name].detach() for n in named])
                self.p[name] = stacked
                if share_memory:
                    for m, params in enumerate(named):
                        params[name].data = stacked[m]
        self.definitions = None
        if self.system == "relation_attention":
            self.definitions = (first.definition_ids, first.definition_mask)

    # -- building blocks over (M, N, …) -------------------------------------------------------------------------
    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``x (M, N, in) -> (M, N, out)``: one batched matmul on CUDA; on CPU one GEMM per member into a shared
        output (MKL's batched GEMM is slower there than M plain ones, and CPU gains nothing from fewer launches)."""
        weight, bias = self.p[f"{name}.weight"], self.p[f"{name}.bias"]
        if x.device.type != "cpu":
            return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
        out = x.new_empty((*x.shape[:-1], weight.size(1)))
        for m in range(self.members):
            torch.addmm(bias[m], x[m], weight[m].t(), out=out[m])
        return out

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Per-member LayerNorm: normalise (no affine), then the member's scale and shift in one fused op."""
        normed = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return torch.addcmul(self.p[f"{name}.bias"].unsqueeze(1), normed, self.p[f"{name}.weight"].unsqueeze(1))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``(M, B, T, H)`` for inputs shared by all members."""
        m, (b, t), h = self.members, input_ids.shape, self.hidden
        e = "encoder.embeddings"
        x = (self.p[f"{e}.word_embeddings.weight"][:, input_ids]  # (M, B, T, H)
             + self.p[f"{e}.token_type_embeddings.weight"][:, 0][:, None, None, :]
             + self.p[f"{e}.position_embeddings.weight"][:, :t][:, None, :, :])
        x = self._norm(x.reshape(m, b * t, h), f"{e}.LayerNorm")
        mask = attention_mask.bool()[:, None, None, :].expand(b, 1, 1, t)
        mask = mask.unsqueeze(0).expand(m, b, 1, 1, t).reshape(m * b, 1, 1, t)
        head_dim = h // self.heads
        for i in range(self.layers):
            layer = f"encoder.encoder.layer.{i}"

            def heads(y: torch.Tensor) -> torch.Tensor:
                return y.view(m * b, t, self.heads, head_dim).transpose(1, 2)

            q = heads(self._linear(x, f"{layer}.attention.self.query"))
            k = heads(self._linear(x, f"{layer}.attention.self.key"))
            v = heads(self._linear(x, f"{layer}.attention.self.value"))
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=head_dim ** -0.5)
            context = context.transpose(1, 2).reshape(m, b * t, h)
            x = self._norm(self._linear(context, f"{layer}.attention.output.dense") + x, f"{layer}.attention.output.LayerNorm")
            inner = self.act(self._linear(x, f"{layer}.intermediate.dense"))
            x = self._norm(self._linear(inner, f"{layer}.output.dense") + x, f"{layer}.output.LayerNorm")
        return x.view(m, b, t, h)

    def relation_states(self) -> torch.Tensor | None:
        """Every member's R (M, 13, H), or None without relation attention; computed once per prediction call."""
        if self.system != "relation_attention":
            return None
        ids, mask = self.definitions
        return self.encode(ids, mask)[:, :, 0]

    def __call__(self, input_ids, attention_mask, subject, obj, relations: torch.Tensor | None = None) -> torch.Tensor:
        states = self.encode(input_ids, attention_mask)
        rows = torch.arange(states.size(1), device=states.device)
        pair = torch.cat([states[:, rows, subject], states[:, rows, obj]], dim=-1)  # (M, B, 2H)
        if self.system == "relation_attention":
            if relations is None:
                relations = self.relation_states()
            query = self._linear(pair, "query")
            attention = torch.softmax(query @ relations.transpose(1, 2) / relations.size(-1) ** 0.5, dim=-1)
            pair = torch.cat([pair, attention @ relations], dim=-1)
        return self._linear(pair, "classifier")


DEFAULT_TOKEN_BUDGET = 16384  # drugprot.inference.scorers.pair_probabilities' default


@torch.no_grad()
def stacked_probabilities(stacked, pairs: Sequence[EncodedPair], *, pad_id: int, device: torch.device,
                          precision: str = "bf16", token_budget: int | None = None, max_pairs: int = 256) -> torch.Tensor:
    """Softmax over LABELS for every member and pair: ``(M, len(pairs), len(LABELS))`` float32 on CPU.

    Token-budget batches like :func:`drugprot.inference.scorers.pair_probabilities`; each batch is one forward of all
    members. Default budget: on CUDA the single-model budget per member (M× the activations in one launch: that
    is where stacking gains on a GPU); on CPU the single-model budget shared by the members (compute-bound there,
    and larger batches only spill the caches).
    """
    if token_budget is None:
        token_budget = DEFAULT_TOKEN_BUDGET if device.type == "cuda" else max(1024, DEFAULT_TOKEN_BUDGET // stacked.members)
    out = torch.zeros((stacked.members, len(pairs), len(LABELS)))
    batches = token_budget_batches(pairs, token_budget=token_budget, max_pairs=max_pairs)
    with autocast(device, precision):
        relations = stacked.relation_states()  # the definitions once per call, not once per batch
    for rows, batch in zip(batches, iterate_batches(pairs, batches, pad_id)):
        batch = batch.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = stacked(batch.input_ids, batch.attention_mask, batch.subject, batch.object, relations)
        out[:, torch.tensor(rows)] = torch.softmax(logits.float(), dim=-1).cpu()
    return out
