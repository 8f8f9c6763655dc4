"""FGEMR: a GENE-Y/GENE-N classifier whose predictions choose the fine gene markers at dev/test time.

Training sees gold fine types (training genes are GENE-Y or GENE-N); development and test genes are plain GENE,
so the relation model's fine markers there come from this classifier. Its accuracy is measured on a held-out
share of the training documents, chosen from the run seed. It is trained by ``drugprot.training.train_gene_typer``,
through the same step as the relation model.
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


def collate_genes(examples: Sequence[GeneExample], pad_id: int):
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
        ids, mask, position, _ = collate_genes([examples[i] for i in members], pad_id)
        with autocast(device, precision):
            logits = typer(ids.to(device), mask.to(device), position.to(device))
        for i, label in zip(members, logits.argmax(-1).tolist()):
            predictions[i] = label
    return predictions


def split_holdout(documents: Sequence[Document], holdout: float, seed: int) -> tuple[list[Document], list[Document]]:
    """``(held out, used)``: a ``holdout`` share of the documents (at least one when there are two), chosen by ``seed``."""
    docs = list(documents)
    random.Random(seed).shuffle(docs)
    cut = max(1, int(round(len(docs) * holdout))) if len(docs) > 1 else 0
    return docs[:cut], docs[cut:]


def holdout_report(typer: GeneTypeClassifier, tokenizer, held: Sequence[Document], *, device: torch.device,
                   max_length: int, precision: str, steps: int) -> dict:
    """The typer's accuracy on the known-type genes of the held-out documents, with the counts behind it."""
    examples = [e for e in gene_examples(held, tokenizer, max_length) if e.label >= 0]
    correct = sum(int(p == e.label) for p, e in zip(_predict(typer, examples, tokenizer.pad_token_id, device, precision), examples))
    return {"gene_typer_holdout_docs": len(held), "gene_typer_holdout_genes": len(examples),
            "gene_typer_accuracy": correct / len(examples) if examples else float("nan"), "gene_typer_steps": steps}


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
