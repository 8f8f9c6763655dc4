"""Inference shortcut: the relation head reads only the two start-marker states, so the encoder's last layer needs
its queries, attention output and feed-forward at those two positions only (its keys and values still cover every
token). Same numbers as the full encoder up to float rounding; one layer's feed-forward work is saved.

BERT-layout encoders only (BERT, RoBERTa and their biomedical variants: ``embeddings``, ``encoder.layer`` of layers
with ``attention.self``, ``attention.output`` and ``feed_forward_chunk``); others run the full encoder."""

from __future__ import annotations

import torch
from torch import nn


def supports_marker_states(encoder: nn.Module) -> bool:
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers) or getattr(encoder.config, "is_decoder", False):
        return False
    last = layers[-1]
    attention = getattr(last, "attention", None)
    return (hasattr(encoder, "embeddings") and hasattr(last, "feed_forward_chunk")
            and all(hasattr(getattr(attention, "self", None), name) for name in ("query", "key", "value", "scaling"))
            and hasattr(attention, "output"))


def marker_states(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """(B, P, H) last-layer states at ``positions`` (B, P), computing the last layer at those positions only."""
    from transformers.masking_utils import create_bidirectional_mask

    hidden = encoder.embeddings(input_ids=input_ids)
    mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)
    *layers, last = encoder.encoder.layer
    for layer in layers:
        hidden = layer(hidden, mask)
    attention = last.attention.self
    batch, width = input_ids.shape
    heads, size = attention.num_attention_heads, attention.attention_head_size
    chosen = hidden[torch.arange(batch, device=hidden.device)[:, None], positions]

    def split(states: torch.Tensor) -> torch.Tensor:
        return states.view(batch, -1, heads, size).transpose(1, 2)

    keep = attention_mask[:, None, None, :].bool()
    mixed = nn.functional.scaled_dot_product_attention(
        split(attention.query(chosen)), split(attention.key(hidden)), split(attention.value(hidden)), attn_mask=keep,
        scale=attention.scaling)
    mixed = mixed.transpose(1, 2).reshape(batch, positions.size(1), heads * size)
    return last.feed_forward_chunk(last.attention.output(mixed, chosen))
