"""FGEMR: a GENE-Y/GENE-N classifier whose predictions choose the fine gene markers at dev/test time.

Training sees gold fine types (training genes are GENE-Y or GENE-N); development and test genes are plain GENE,
so the relation model's fine markers there come from this classifier. Its accuracy is measured on a held-out
share of the training documents, chosen from the run seed.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from drugprot.candidates import sentence_spans
from drugprot.corpus import Document
from drugprot.encoding import marker_tokens, token_budget_batches
from drugprot.model.runtime import autocast
from drugprot.model.heads import GeneTypeClassifier
from drugprot.model.optim import build_optimizer, linear_schedule


@dataclass(frozen=True, slots=True)
class GeneExample:
    input_ids: tuple[int, ...]
    position: int
    label: int  # index in GeneTypeClassifier.CLASSES, or -1 when unknown
    key: tuple[str, str]  # (pmid, entity id)


def gene_examples(documents: Sequence[Document], tokenizer, max_length: int) -> list[GeneExample]:
    """One example per gene mention: its sentence with [O:GENE] … [/O:GENE] around it, windowed to fit."""
    open_id, close_id = (tokenizer.convert_tokens_to_ids(t) for t in marker_tokens("GENE", "O"))
    plan, texts = [], []
    for doc in documents:
        spans = sentence_spans(doc)
        for gene in (e for e in doc.entities.values() if e.is_gene):
            start, end = next((s, e) for s, e in spans if s <= gene.start and gene.end <= e)
            plan.append((doc.pmid, gene))
            texts.extend([doc.text[start:gene.start], doc.text[gene.start:gene.end], doc.text[gene.end:end]])
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    budget = max_length - 2
    examples = []
    for n, (pmid, gene) in enumerate(plan):
        left, mid, right = ids[3 * n: 3 * n + 3]
        mid = mid[: budget - 2]
        room = budget - len(mid) - 2
        keep_left = min(len(left), max(room // 2, room - len(right)))
        body = [*left[len(left) - keep_left:], open_id, *mid, close_id, *right][:budget]
        label = GeneTypeClassifier.CLASSES.index(gene.type) if gene.type in GeneTypeClassifier.CLASSES else -1
        examples.append(GeneExample((tokenizer.cls_token_id, *body, tokenizer.sep_token_id), keep_left + 1, label, (pmid, gene.id)))
    return examples


def _collate(examples: Sequence[GeneExample], pad_id: int):
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, ex in enumerate(examples):
        ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        mask[row, : len(ex.input_ids)] = 1
    return ids, mask, torch.tensor([e.position for e in examples]), torch.tensor([e.label for e in examples])


@torch.no_grad()
def _predict(typer: GeneTypeClassifier, examples: Sequence[GeneExample], pad_id: int, device: torch.device,
             precision: str = "bf16") -> list[int]:
    typer.eval()
    predictions = [0] * len(examples)
    for members in token_budget_batches(examples, token_budget=16384, max_pairs=256):
        ids, mask, position, _ = _collate([examples[i] for i in members], pad_id)
        with autocast(device, precision):
            logits = typer(ids.to(device), mask.to(device), position.to(device))
        for i, label in zip(members, logits.argmax(-1).tolist()):
            predictions[i] = label
    return predictions


def train_gene_typer(encoder, tokenizer, documents: Sequence[Document], *, epochs: float, lr: float, holdout: float,
                     seed: int, max_length: int, token_budget: int, max_pairs: int, device: torch.device,
                     precision: str = "bf16", dropout: float = 0.1) -> tuple[GeneTypeClassifier, dict]:
    """Train on the training genes minus a held-out share of documents; report held-out accuracy."""
    docs = list(documents)
    random.Random(seed).shuffle(docs)
    cut = max(1, int(round(len(docs) * holdout))) if len(docs) > 1 else 0
    held, used = docs[:cut], docs[cut:]
    train_examples = [e for e in gene_examples(used, tokenizer, max_length) if e.label >= 0]
    if not train_examples:
        from drugprot.errors import DrugprotError

        raise DrugprotError("model.system fgemr: the training split has no GENE-Y/GENE-N genes to learn from")
    typer = GeneTypeClassifier(encoder, dropout=dropout).to(device)
    optimizer = build_optimizer(typer, lr=lr, weight_decay=0.01, device=device)
    per_epoch = token_budget_batches(train_examples, token_budget=token_budget, max_pairs=max_pairs)
    total = max(1, int(round(epochs * len(per_epoch))))
    scheduler = linear_schedule(optimizer, total_steps=total, warmup_steps=int(0.1 * total))
    step = epoch = 0
    while step < total:
        for members in token_budget_batches(train_examples, token_budget=token_budget, max_pairs=max_pairs,
                                            shuffle_seed=seed * 1000 + epoch):
            if step >= total:
                break
            typer.train()
            ids, mask, position, label = (t.to(device) for t in _collate([train_examples[i] for i in members], tokenizer.pad_token_id))
            with autocast(device, precision):
                logits = typer(ids, mask, position)
            loss = torch.nn.functional.cross_entropy(logits.float(), label)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(typer.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        epoch += 1
    held_examples = [e for e in gene_examples(held, tokenizer, max_length) if e.label >= 0]
    correct = sum(int(p == e.label) for p, e in zip(_predict(typer, held_examples, tokenizer.pad_token_id, device, precision), held_examples))
    report = {"gene_typer_holdout_docs": len(held), "gene_typer_holdout_genes": len(held_examples),
              "gene_typer_accuracy": correct / len(held_examples) if held_examples else float("nan"),
              "gene_typer_steps": total}
    return typer, report


def predict_gene_types(typer: GeneTypeClassifier, tokenizer, documents: Sequence[Document], *, device: torch.device,
                       max_length: int, precision: str = "bf16") -> dict[tuple[str, str], str]:
    """Predicted GENE-Y/GENE-N for every gene whose type is the coarse GENE."""
    examples = [e for e in gene_examples(documents, tokenizer, max_length) if e.label < 0]
    labels = _predict(typer, examples, tokenizer.pad_token_id, device, precision)
    return {e.key: GeneTypeClassifier.CLASSES[label] for e, label in zip(examples, labels)}


def apply_gene_types(documents: Sequence[Document], types: dict[tuple[str, str], str]) -> list[Document]:
    """Copies of ``documents`` whose listed genes carry the given fine types; nothing else changes."""
    typed = []
    for doc in documents:
        entities = {eid: (dataclasses.replace(e, type=types[(doc.pmid, eid)]) if (doc.pmid, eid) in types else e)
                    for eid, e in doc.entities.items()}
        typed.append(dataclasses.replace(doc, entities=entities, relations=list(doc.relations),
                                         duplicate_relations=list(doc.duplicate_relations)))
    return typed
