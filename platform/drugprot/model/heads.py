"""The relation model: encoder + marker-state pair representation + the paper's optional heads.

* baseline: ``[h(S:CHEMICAL); h(O:GENE)]`` → dropout → linear over NONE + 13 types.
* relation_attention: each type's definition text is encoded by the same encoder; its [CLS] state is a row of
  R (13 × H). A query ``q = W[h_s; h_o]`` attends over R, ``a = softmax(R q / √H)``, ``s = aᵀR``, and the
  classifier reads ``[h_s; h_o; s]`` (concatenation keeps the pair evidence intact and lets the head weigh the
  definition context; we chose it over addition, which would force s into the marker-state space).
* multitask: an entity-type head on each start-marker state (CHEMICAL / GENE-Y / GENE-N), trained with weight
  1 − λ while the relation loss gets λ.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from drugprot.encoding import ENTITY_CLASSES, IGNORE_INDEX, LABELS
from drugprot.model.loss import adaptive_threshold_loss, focal_loss
from drugprot.model.marker_states import marker_states, supports_marker_states


class RelationModel(nn.Module):
    def __init__(self, encoder: nn.Module, *, system: str = "baseline", dropout: float = 0.1,
                 definition_ids: torch.Tensor | None = None, definition_mask: torch.Tensor | None = None,
                 multilabel: bool = False):
        super().__init__()
        self.encoder = encoder
        self.system = system
        self.multilabel = multilabel  # types over the NONE logit (adaptive threshold) instead of one argmax type
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        width = 2 * hidden
        if system == "relation_attention":
            if definition_ids is None:
                raise ValueError("relation_attention needs the tokenized relation definitions")
            self.register_buffer("definition_ids", definition_ids, persistent=True)
            self.register_buffer("definition_mask", definition_mask, persistent=True)
            self.query = nn.Linear(2 * hidden, hidden)
            width += hidden
        if system == "multitask":
            self.entity_head = nn.Linear(hidden, len(ENTITY_CLASSES))
        self.classifier = nn.Linear(width, len(LABELS))

    def pair_states(self, input_ids, attention_mask, subject, obj, *,
                    markers_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``markers_only`` (inference): the last layer computes the two marker positions only, where the encoder
        allows it (see drugprot.model.marker_states)."""
        if markers_only and supports_marker_states(self.encoder):
            states = marker_states(self.encoder, input_ids, attention_mask, torch.stack([subject, obj], dim=1))
            return states[:, 0], states[:, 1]
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(states.size(0), device=states.device)
        return states[rows, subject], states[rows, obj]

    def relation_states(self) -> torch.Tensor | None:
        """R: the [CLS] states of the 13 definitions (13 × H); None for systems without relation attention."""
        if self.system != "relation_attention":
            return None
        return self.encoder(input_ids=self.definition_ids, attention_mask=self.definition_mask).last_hidden_state[:, 0]

    def forward(self, input_ids, attention_mask, subject, obj, relations: torch.Tensor | None = None, *,
                markers_only: bool = False) -> dict[str, torch.Tensor]:
        """``relations``: R computed once by :meth:`relation_states` for a whole evaluation or prediction call (the
        weights do not change there); in training it is left None and recomputed, so the definitions get gradients.
        ``markers_only``: see :meth:`pair_states`."""
        h_s, h_o = self.pair_states(input_ids, attention_mask, subject, obj, markers_only=markers_only)
        pair = torch.cat([h_s, h_o], dim=-1)
        if self.system == "relation_attention":
            if relations is None:
                relations = self.relation_states()
            query = self.query(pair)
            attention = torch.softmax(query @ relations.T / math.sqrt(relations.size(-1)), dim=-1)
            pair = torch.cat([pair, attention @ relations], dim=-1)
        out = {"logits": self.classifier(self.dropout(pair))}
        if self.system == "multitask":
            out["entity_logits"] = self.entity_head(self.dropout(torch.stack([h_s, h_o], dim=1)))
        return out

    def loss(self, out: dict[str, torch.Tensor], target: torch.Tensor, entity_types: torch.Tensor, *,
             gamma: float, lambda_: float, step_counts: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
        """The batch's mean loss (relation terms over pairs, entity terms over labelled entities).

        ``step_counts``: the pairs and the labelled entities of the whole optimizer step when this batch is one of
        its micro-batches; the result is then this batch's share of the step's mean, and the shares of all its
        micro-batches add up to the loss of the step as one batch.
        """
        relation = (adaptive_threshold_loss(out["logits"], target) if self.multilabel
                    else focal_loss(out["logits"], target, gamma))
        if step_counts is not None:
            relation = relation * (target.size(0) / step_counts[0])
        if self.system != "multitask":
            return relation
        logits, labels = out["entity_logits"].float().reshape(-1, len(ENTITY_CLASSES)), entity_types.reshape(-1)
        if step_counts is None:
            entity = nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        else:
            entity = nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / step_counts[1]
        return lambda_ * relation + (1 - lambda_) * entity


class GeneTypeClassifier(nn.Module):
    """FGEMR's GENE-Y/GENE-N classifier: a gene marked with [O:GENE] … [/O:GENE] in its sentence, read at the marker."""

    CLASSES = ("GENE-Y", "GENE-N")

    def __init__(self, encoder: nn.Module, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, len(self.CLASSES))

    def forward(self, input_ids, attention_mask, position) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(states.size(0), device=states.device)
        return self.classifier(self.dropout(states[rows, position]))
