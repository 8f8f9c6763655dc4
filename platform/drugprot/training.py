"""One training run from a config: encode once, train in optimizer steps of ``batch_pairs`` pairs (micro-batches
within the token budget), evaluate every ``eval_every`` epochs with the official-equivalent scorer, keep the best
model, checkpoint for exact resumption. A final run (``data.final``) trains on train + dev for ``train.max_steps``
steps instead, scores nothing and keeps the last model.

Training never imports Ray or MLflow: whoever listens passes ``report(metrics, run_dir)``; tuning passes Ray's,
the CLI passes nothing. Every source of randomness is derived from ``train.seed``: the model initialisation and
dropout (torch's generator, saved in checkpoints) and each epoch's batch order (``seed * 1000 + epoch``), so a
resumed run continues exactly where the interrupted one stood.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml

from drugprot.candidates import corpus_candidates
from drugprot.config import ConfigError, RunConfig, build_config
from drugprot.corpus import Document, read_split
from drugprot.dev_halves import SELECTION_METRIC, DevHalves, score_halves, split_halves
from drugprot.encoding import (IGNORE_INDEX, LABELS, Batch, PairEncoder, add_marker_tokens, iterate_batches, step_batches,
                               token_budget_batches)
from drugprot.errors import DrugprotError
from drugprot.inference.scorers import pair_probabilities
from drugprot.inference.voting import Decision, decode
from drugprot.model.artifacts import save_artifact
from drugprot.model.compiled import bucketed, compiled_forward, to_bucket
from drugprot.model.dev_probabilities import save_dev_probabilities
from drugprot.model.encoder import build_encoder, load_tokenizer
from drugprot.model.heads import GeneTypeClassifier, RelationModel
from drugprot.model.loss import distillation_loss
from drugprot.model.optim import build_optimizer, linear_schedule
from drugprot.model.runtime import autocast, resolve_device

Report = Callable[[dict[str, Any], Path], None]
DEFINITIONS_FILE = Path(__file__).parent / "resources" / "relation_definitions.yaml"


@dataclass
class TrainResult:
    run_dir: Path
    best: dict[str, Any] | None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] | None = None  # a data.final run: what it trained on (see final_record); it has no best

    @property
    def best_f1(self) -> float:
        """The best checkpoint's F1 on dev half A, the figure that chose it."""
        return self.best[SELECTION_METRIC] if self.best else 0.0

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


def non_embedding_parameters(module: torch.nn.Module) -> int:
    """Parameters that cost 6 FLOPs per token in training (embedding look-ups cost none)."""
    return sum(p.numel() for n, p in module.named_parameters() if "embeddings" not in n)


def interval_recall(stats) -> float:
    """Share of the gold relations that the GENE interval keeps (other losses, across sentences, are not counted)."""
    return 1.0 - stats.lost_by_interval / stats.gold_relations if stats.gold_relations else 1.0


def load_documents(config: RunConfig) -> tuple[list[Document], list[Document]]:
    data = config.data
    train = read_split(data.dir, data.train_split).documents[: data.max_train_docs]
    dev = read_split(data.dir, data.dev_split).documents[: data.max_dev_docs]
    return train, dev


def final_record(trained_on: dict[str, int], documents: Sequence[Document], pairs: int, steps: int) -> dict[str, Any]:
    """What a ``data.final`` run trained on, for its metrics.json (every document id) and its model's drugprot.json
    (the ids' sha256 instead): documents per split, the training pairs they gave and the optimizer steps."""
    import hashlib

    pmids = [d.pmid for d in documents]
    return {"trained_on": trained_on, "pairs": pairs, "steps": steps,
            "documents_sha256": hashlib.sha256("\n".join(pmids).encode()).hexdigest(), "documents": pmids}


def relation_definitions(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    from drugprot.corpus import RELATION_TYPES

    texts = yaml.safe_load(DEFINITIONS_FILE.read_text())
    batch = tokenizer([texts[t] for t in RELATION_TYPES], padding=True, truncation=True, max_length=64, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def _atomic_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


class _Checkpoint:
    """Latest training state in ``run_dir/checkpoint`` (safetensors + JSON), replaced atomically."""

    def __init__(self, run_dir: Path):
        self.folder = run_dir / "checkpoint"

    def exists(self) -> bool:
        return (self.folder / "state.json").is_file()

    def save(self, *, model, optimizer, scheduler, gene_typer, step: int, evaluations: list, extra: dict) -> None:
        from safetensors.torch import save_file

        tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        opt_state = optimizer.state_dict()
        for index, state in opt_state["state"].items():
            for name, value in state.items():
                tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().contiguous().cpu()
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        if gene_typer is not None:
            tensors.update({f"gene_typer.{k}": v.detach().contiguous().cpu() for k, v in gene_typer.state_dict().items()})
        staging = Path(tempfile.mkdtemp(dir=self.folder.parent, prefix=".checkpoint."))
        try:
            save_file(_dedupe(tensors), str(staging / "state.safetensors"))
            (staging / "state.json").write_text(json.dumps({
                "step": step, "scheduler_last_epoch": scheduler.last_epoch, "param_groups": opt_state["param_groups"],
                "evaluations": evaluations, "extra": extra}, indent=1))
            if self.folder.exists():
                shutil.rmtree(self.folder)
            staging.rename(self.folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def load_gene_typer(self, gene_typer) -> bool:
        from safetensors.torch import load_file

        tensors = load_file(str(self.folder / "state.safetensors"))
        state = {k[len("gene_typer."):]: v for k, v in tensors.items() if k.startswith("gene_typer.")}
        if not state:
            return False
        gene_typer.load_state_dict(state)
        return True

    def restore(self, *, model, optimizer, scheduler, device) -> dict:
        from safetensors.torch import load_file

        meta = json.loads((self.folder / "state.json").read_text())
        tensors = load_file(str(self.folder / "state.safetensors"))
        missing, unexpected = model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                                                    strict=False)
        if missing or unexpected:  # a checkpoint of another architecture must not load half-way, silently
            raise DrugprotError(f"{self.folder}: the checkpoint does not fit this config's model (missing "
                                f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); resume with the config "
                                f"it was trained with, or train into a new --out folder")
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        scheduler.last_epoch = meta["scheduler_last_epoch"]
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        return meta


def _dedupe(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): store each under its own copy."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        pointer = value.untyped_storage().data_ptr() if value.numel() else id(value)
        out[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    return out


def train_step(model: RelationModel, batch: Batch | Sequence[Batch], optimizer: torch.optim.Optimizer, scheduler=None,
               *, device: torch.device, precision: str = "bf16", gamma: float = 0.0, lambda_: float = 0.5,
               grad_clip: float = 1.0, forward: Callable | None = None, teacher: torch.Tensor | None = None,
               temperature: float = 1.0, teacher_weight: float = 0.0,
               loss_fn: Callable[[Any], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch, or on the micro-batches of one step, already on ``device``: autocast
    forward, loss, backward (per micro-batch), clip, step.

    Micro-batches accumulate gradients: each one's loss counts as its share of the step's mean (over the step's
    pairs; multitask's entity terms over its labelled entities), so the step is that of one batch of all their pairs,
    within rounding, while the memory is one micro-batch's.
    ``forward`` is the callable that runs the model (a ``torch.compile``d wrapper, say; default ``model``).
    ``teacher``: (pairs, L) target probabilities for distillation, rows in the micro-batches' order, weighted
    ``teacher_weight`` against the gold loss.
    ``loss_fn``: for another model (FGEMR's gene typer), the loss of ``batch``, one batch of whatever it takes,
    forward included (run under autocast).
    Returns ``(loss, nonfinite)``, both detached and left on the device (no host synchronisation): ``nonfinite`` is
    true when the loss or the gradient norm was not finite, in which case the weights and the optimizer state were
    left as they were. With the fused AdamW of :func:`build_optimizer` the skip happens on the device (it honours
    ``found_inf``, the protocol ``torch.amp.GradScaler`` uses), so no step waits for the host to look at the loss.
    """
    model.train()
    if loss_fn is not None:
        with autocast(device, precision):
            loss = loss_fn(batch)
        loss.backward()
        total = loss.detach()
    else:
        parts = [batch] if isinstance(batch, Batch) else list(batch)
        pairs = sum(part.input_ids.size(0) for part in parts)
        counts = None
        if len(parts) > 1:
            counts = (pairs, sum((part.entity_types != IGNORE_INDEX).sum() for part in parts).clamp_min(1))
        run = model if forward is None else forward  # a compiled module has no truth value (it proxies len())
        total = torch.zeros((), device=device)
        done = 0
        for part in parts:
            size = part.input_ids.size(0)
            with autocast(device, precision):
                out = run(part.input_ids, part.attention_mask, part.subject, part.object)
            loss = model.loss(out, part.target, part.entity_types, gamma=gamma, lambda_=lambda_, step_counts=counts)
            if teacher is not None:
                distill = distillation_loss(out["logits"], teacher[done:done + size], temperature) * (size / pairs)
                loss = (1 - teacher_weight) * loss + teacher_weight * distill
            loss.backward()
            total = total + loss.detach()
            done += size
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    nonfinite = ~(torch.isfinite(total) & torch.isfinite(norm))
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = nonfinite.float()
        optimizer.step()
    elif not nonfinite.item():  # another optimizer (a benchmark's plain AdamW): the host decides
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total, nonfinite


class NonFiniteTraining(DrugprotError):
    """Too many consecutive steps with a non-finite loss or gradient norm: the run stops instead of going on."""


class _NonFiniteGuard:
    """Counts skipped steps on the device; the host looks every step on CPU, every ``limit`` steps on a GPU."""

    def __init__(self, limit: int, device: torch.device, skipped: int = 0):
        self.limit = limit
        self.every = limit if device.type == "cuda" else 1
        self.skipped = torch.tensor(skipped, device=device)
        self.run = torch.tensor(0, device=device)
        self.longest = torch.tensor(0, device=device)
        self.last_loss = torch.tensor(0.0, device=device)

    def update(self, loss: torch.Tensor, nonfinite: torch.Tensor) -> None:
        self.skipped += nonfinite
        self.run = (self.run + 1) * nonfinite
        self.longest = torch.maximum(self.longest, self.run)
        self.last_loss = torch.where(nonfinite, loss.float(), self.last_loss)

    def check(self, step: int, config: RunConfig, *, force: bool = False) -> None:
        if not force and step % self.every:
            return
        if int(self.longest) >= self.limit:
            raise NonFiniteTraining(
                f"step {step}: {int(self.longest)} consecutive steps had a non-finite loss or gradient norm (last loss "
                f"{float(self.last_loss)}; {int(self.skipped)} skipped in all), train.max_nonfinite_steps is "
                f"{self.limit}: stopping rather than training on. Config: loss.gamma={config.loss.gamma}, "
                f"loss.lambda={config.loss.lambda_}, train.lr={config.train.lr}, train.precision={config.train.precision}, "
                f"train.grad_clip={config.train.grad_clip}, model.system={config.model.system}, "
                f"encoder.name={config.encoder.name}. Lower train.lr or use train.precision fp32")
        self.longest.zero_()


def enable_gradient_checkpointing(encoder, name: str) -> None:
    """transformers' activation checkpointing, non-reentrant (torch's recommended form; dropout masks are replayed).

    ``activation_checkpointing_enable`` is the current name (the old one warns that it is deprecated); a transformers
    too old to have it has ``gradient_checkpointing_enable``, which takes the same first argument (its Trainer does
    the same)."""
    if not getattr(encoder, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: encoder.name {name!r} ({type(encoder).__name__}) does not "
                          f"support gradient checkpointing; set train.gradient_checkpointing to false")
    enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def evaluation_steps(steps_per_epoch: int, total_steps: int, eval_every: float) -> list[int]:
    """Steps after which to evaluate: the k-th lands at k·eval_every epochs (rounded to a step), the last at the end.

    Placing each evaluation from its own epoch fraction (not by repeating a rounded interval) keeps the count and
    the epochs exact: 10 epochs at eval_every 0.5 give 20 evaluations at 0.5, 1.0, … 10.0 whatever the epoch size.
    """
    count = max(1, math.ceil(total_steps / steps_per_epoch / eval_every - 1e-9))
    steps = {min(total_steps, max(1, round(k * eval_every * steps_per_epoch))) for k in range(1, count + 1)}
    return sorted(steps | {total_steps})


def _revalidate(config: RunConfig) -> RunConfig:
    """Validate again (a config may have been built with ``model_construct`` or edited): ConfigError, key named."""
    if not isinstance(config, RunConfig):
        raise ConfigError(f"train: expected a RunConfig (drugprot.config.load_config), got {type(config).__name__}")
    return build_config(config.dump(), "config")


def train(config: RunConfig, run_dir: str | os.PathLike, *, report: Report | None = None, resume: bool = False,
          progress: bool = True, log: Callable[[str], None] | None = None,
          checkpoint_every: int | None = None,
          teacher: Callable[[list[Document], list], torch.Tensor] | None = None) -> TrainResult:
    """Train one model; the best checkpoint by micro-F1 on dev half A ends up in ``run_dir/model``.

    Half A (``data.selection_seed``, drugprot.dev_halves) chooses the checkpoint, and is what a listener should rank
    by (``dev_f1_a``); ``dev_f1_all`` is the whole development set. Half B is scored only for the saved model's
    record (``drugprot.json``), never reported per evaluation, so nothing that listens can choose by it.

    The best model is written when it improves; the resumable state (weights, AdamW moments, RNG: three times the
    model's size) every ``checkpoint_every`` evaluations (default: once per epoch) and at the end, because writing
    it stalls the device and, in a study, every byte of it is uploaded to the storage.

    ``teacher(documents, candidates)`` gives (candidates, labels) target probabilities over the training pairs:
    the student then learns from them too (``distill`` section of the config; drugprot.distillation).

    With ``data.final`` the development documents join the training ones, training runs exactly
    ``train.max_steps`` steps and the model kept is the last step's: nothing is scored (the "evaluations" are
    progress points without dev figures), ``best`` is None and ``final`` (also in metrics.json, and without the
    document ids in the model's drugprot.json) records what was trained on.

    ``report(metrics, run_dir)`` is called after every evaluation, once the run folder (best model, metrics.json,
    checkpoint) is consistent; ``metrics["model_saved"]`` and ``metrics["state_saved"]`` say what changed, so a
    listener copies only that.
    """
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    # Everything that can reject the run (config, device, data, tokenizer) is checked before run_dir is created,
    # so a bad config or a missing corpus leaves nothing behind.
    config = _revalidate(config)
    cfg = config.train
    device = resolve_device(cfg.device)
    train_docs, dev_docs = load_documents(config)
    trained_on = None
    if config.data.final:  # the development documents join the training ones; none is left to evaluate on
        trained_on = {config.data.train_split: len(train_docs), config.data.dev_split: len(dev_docs)}
        train_docs, dev_docs = [*train_docs, *dev_docs], []
    tokenizer = load_tokenizer(config.encoder.name, config.encoder.lowercase, say=say)
    add_marker_tokens(tokenizer)
    interval = tuple(config.sampling.interval)
    pair_encoder = PairEncoder(tokenizer, max_length=config.encoder.max_length, markers=config.model.markers,
                               context=config.encoding.context)
    train_candidates, train_stats = corpus_candidates(train_docs, interval)
    train_pairs, train_encoding = pair_encoder.encode(train_docs, train_candidates)
    if not train_pairs:
        raise DrugprotError(f"data.dir {config.data.dir}: no training pairs after candidate generation and encoding "
                            f"({len(train_docs)} documents, {len(train_candidates)} candidates, "
                            f"{train_encoding.too_long} longer than encoder.max_length {config.encoder.max_length})")

    targets = teacher(train_docs, train_candidates) if teacher is not None else None
    if targets is not None and tuple(targets.shape) != (len(train_candidates), len(LABELS)):
        raise ValueError(f"teacher gave {tuple(targets.shape)} probabilities for {len(train_candidates)} training pairs")

    run_dir = Path(run_dir)
    checkpoint = _Checkpoint(run_dir)
    if resume and not checkpoint.exists():
        say(f"no checkpoint in {run_dir}; starting from scratch")
        resume = False
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    transformers.set_seed(cfg.seed)

    extra: dict[str, Any] = {}
    gene_typer = None
    if config.model.system == "fgemr":
        # dev genes get the typer's GENE-Y/GENE-N predictions, so the dev pairs below carry fine markers
        gene_typer, dev_docs, extra = _fgemr(config, tokenizer, train_docs, dev_docs, checkpoint if resume else None,
                                             device, say)

    encoder = build_encoder(config.encoder.name, tiny=config.encoder.tiny, seed=cfg.seed)
    encoder.resize_token_embeddings(len(tokenizer))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(encoder, config.encoder.name)
    definitions = relation_definitions(tokenizer) if config.model.system == "relation_attention" else (None, None)
    model = RelationModel(encoder, system=config.model.system, dropout=config.model.dropout,
                          definition_ids=definitions[0], definition_mask=definitions[1],
                          multilabel=config.model.multilabel).to(device)

    # the share of gold relations this run's GENE interval keeps: [0, 0] throws about 65% of them away
    ceilings = {"train_interval_recall": interval_recall(train_stats)}
    pad_id = tokenizer.pad_token_id
    steps_per_epoch = math.ceil(len(train_pairs) / cfg.batch_pairs)  # optimizer steps, whatever the memory caps
    total_steps = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    final = final_record(trained_on, train_docs, len(train_pairs), total_steps) if trained_on else None
    if final:
        say(f"final model: training pairs {len(train_pairs)} of {final['trained_on']} documents "
            f"({train_encoding.too_long} too long for encoder.max_length, {train_encoding.windowed} windowed), "
            f"{total_steps} steps, no dev evaluation, device {device}")
    else:
        halves = split_halves(dev_docs, config.data.selection_seed)
        dev_candidates, dev_stats = corpus_candidates(dev_docs, interval)
        dev_pairs, dev_encoding = pair_encoder.encode(dev_docs, dev_candidates)
        ceilings["dev_interval_recall"] = interval_recall(dev_stats)
        say(f"training pairs {len(train_pairs)} ({train_encoding.too_long} too long for encoder.max_length, "
            f"{train_encoding.windowed} windowed), dev pairs {len(dev_pairs)} ({dev_encoding.too_long} too long), "
            f"gold lost by interval {train_stats.lost_by_interval}/{dev_stats.lost_by_interval} (train/dev), "
            f"device {device}")
    eval_steps = evaluation_steps(steps_per_epoch, total_steps, cfg.eval_every)
    state_every = checkpoint_every or max(1, round(1 / cfg.eval_every))
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, device=device,
                                layer_decay=cfg.layer_decay)
    scheduler = linear_schedule(optimizer, total_steps=total_steps, warmup_steps=int(cfg.warmup * total_steps))

    say(f"{steps_per_epoch} optimizer steps per epoch of {cfg.batch_pairs} pairs ({total_steps} in all), each in "
        f"micro-batches of at most {cfg.token_budget} padded tokens and {cfg.max_batch_pairs} pairs")

    step = 0
    evaluations: list[dict[str, Any]] = []
    if resume:
        meta = checkpoint.restore(model=model, optimizer=optimizer, scheduler=scheduler, device=device)
        step, evaluations = meta["step"], meta["evaluations"]
        say(f"resumed from {checkpoint.folder} at step {step}/{total_steps} ({len(evaluations)} evaluations done)")
    # the run folder appears only now: every refusal above (config, data, encoder, layer decay) left nothing behind
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.dump(), sort_keys=False))  # once the state fits it
    best = None if final else best_evaluation(evaluations)
    guard = _NonFiniteGuard(cfg.max_nonfinite_steps, device, skipped=evaluations[-1].get("nonfinite_steps", 0) if evaluations else 0)

    forward = compiled_forward(model, enabled=cfg.compile, mode=cfg.compile_mode, buckets=cfg.shape_buckets)
    info = {"system": config.model.system, "markers": config.model.markers, "dropout": config.model.dropout,
            "max_length": config.encoder.max_length, "context": config.encoding.context,
            "multilabel": config.model.multilabel, "interval": list(interval), "encoder": config.encoder.name,
            "lowercase": getattr(tokenizer, "do_lower_case", None),
            "labels": list(LABELS), "config": config.dump(),
            "definitions": {"shape": list(definitions[0].shape)} if definitions[0] is not None else None}
    if final:
        info["final"] = {k: v for k, v in final.items() if k != "documents"}
    bar = _progress(total_steps, step, progress)
    window = {"loss": 0.0, "batches": 0, "pairs": 0, "tokens": 0, "start": time.perf_counter()}
    epoch = step // steps_per_epoch
    while step < total_steps:
        epoch_steps = step_batches(bucketed(train_pairs, cfg.shape_buckets), batch_pairs=cfg.batch_pairs,
                                   token_budget=cfg.token_budget, max_pairs=cfg.max_batch_pairs,
                                   shuffle_seed=cfg.seed * 1000 + epoch)
        skip = step - epoch * steps_per_epoch
        for members in epoch_steps[skip:]:
            parts = list(iterate_batches(train_pairs, members, pad_id))
            batch_targets = None if targets is None else targets[torch.cat([part.index for part in parts])].to(device)
            # a plain copy: page-locking each batch first cost 21x the whole MiniLM step on an H200
            # (bench/gpu_step_profile.py, 2026-11-30), far more than the wait a pageable copy adds
            parts = [to_bucket(part, cfg.shape_buckets, pad_id).to(device) for part in parts]
            loss, nonfinite = train_step(model, parts, optimizer, scheduler, device=device, precision=cfg.precision,
                                         gamma=config.loss.gamma, lambda_=config.loss.lambda_, grad_clip=cfg.grad_clip,
                                         forward=forward, teacher=batch_targets, temperature=config.distill.temperature,
                                         teacher_weight=config.distill.weight)
            step += 1
            guard.update(loss, nonfinite)
            guard.check(step, config, force=step in eval_steps)
            window["loss"] += torch.where(nonfinite, 0.0, loss)
            window["batches"] += ~nonfinite
            window["pairs"] += sum(part.input_ids.size(0) for part in parts)
            window["tokens"] += sum(part.attention_mask.sum() for part in parts)
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(pairs_s=f"{window['pairs'] / (time.perf_counter() - window['start']):.1f}", refresh=False)
            if step in eval_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # the queued steps belong to this window's timing
                elapsed = time.perf_counter() - window["start"]
                if final:  # a progress point: the training figures and the resumable state, nothing scored
                    metrics = {}
                else:
                    metrics, held_out, dev_probabilities = _evaluate(model, halves, dev_candidates, dev_pairs, pad_id,
                                                                     device, cfg.precision)
                metrics.update({
                    "eval": len(evaluations) + 1, "step": step, "epoch": round(step / steps_per_epoch, 4),
                    "steps_per_epoch": steps_per_epoch,
                    "train_loss": float(window["loss"]) / max(1, int(window["batches"])),
                    "nonfinite_steps": int(guard.skipped),
                    "pairs_per_s": window["pairs"] / elapsed, "tokens_per_s": float(window["tokens"]) / elapsed,
                    "lr": scheduler.get_last_lr()[0], **ceilings, **extra})
                evaluations.append(metrics)
                saving = time.perf_counter()
                metrics["model_saved"] = step >= total_steps if final else best_evaluation([best, metrics]) is metrics
                if metrics["model_saved"] and final:  # the final model is the last step's
                    save_artifact(run_dir / "model", model=model, tokenizer=tokenizer, info={**info, "dev": None},
                                  gene_typer=gene_typer)
                elif metrics["model_saved"]:
                    best = metrics
                    save_artifact(run_dir / "model", model=model, tokenizer=tokenizer,
                                  info={**info, "dev": {**{k: metrics[k] for k in (*DEV_SCORES, "eval", "epoch")},
                                                        **held_out, "selection_seed": halves.seed}},
                                  gene_typer=gene_typer)
                    save_dev_probabilities(run_dir, dev_candidates, dev_probabilities, labels=LABELS,
                                           split=config.data.dev_split, eval=metrics["eval"],
                                           dev_f1_a=metrics[SELECTION_METRIC], selection_seed=halves.seed)
                metrics["state_saved"] = metrics["eval"] % state_every == 0 or step >= total_steps
                if metrics["state_saved"]:
                    checkpoint.save(model=model, optimizer=optimizer, scheduler=scheduler, gene_typer=gene_typer,
                                    step=step, evaluations=evaluations, extra=extra)
                metrics["save_s"] = time.perf_counter() - saving
                if final:
                    _atomic_json(run_dir / "metrics.json", {"evaluations": evaluations, "best": None, "final": final})
                    say(f"step {step}/{total_steps} epoch {metrics['epoch']:.2f}: loss {metrics['train_loss']:.4f}, "
                        f"{metrics['pairs_per_s']:.1f} pairs/s (final model: no dev evaluation)")
                else:
                    _atomic_json(run_dir / "metrics.json", {"evaluations": evaluations, "best": best,
                                                            "dev_halves": halves.describe()})
                    say(f"eval {metrics['eval']} epoch {metrics['epoch']:.2f}: dev A P {metrics['dev_precision_a']:.4f} "
                        f"R {metrics['dev_recall_a']:.4f} F1 {metrics['dev_f1_a']:.4f} (best {best['dev_f1_a']:.4f}), "
                        f"all dev F1 {metrics['dev_f1_all']:.4f}, loss {metrics['train_loss']:.4f}, "
                        f"{metrics['pairs_per_s']:.1f} pairs/s")
                if report is not None:
                    report(metrics, run_dir)
                window = {"loss": 0.0, "batches": 0, "pairs": 0, "tokens": 0, "start": time.perf_counter()}
            if step >= total_steps:
                break
        epoch += 1
    if bar is not None:
        bar.close()
    return TrainResult(run_dir, best, evaluations, extra, final)


DEV_SCORES = ("dev_precision_a", "dev_recall_a", "dev_f1_a", "dev_precision_all", "dev_recall_all", "dev_f1_all")


def best_evaluation(evaluations) -> dict[str, Any] | None:
    """The evaluation whose checkpoint is kept: the highest F1 on dev half A, the earliest of equals (None: none yet)."""
    best = None
    for evaluation in evaluations:
        if evaluation is not None and (best is None or evaluation[SELECTION_METRIC] > best[SELECTION_METRIC]):
            best = evaluation
    return best


def dev_metrics(halves: DevHalves, predicted) -> tuple[dict[str, Any], dict[str, float]]:
    """Per-evaluation metrics (half A, for decisions; the whole set, per type too) and, apart, the half-B figures."""
    scores = score_halves(halves, predicted)
    metrics: dict[str, Any] = {}
    for half in ("a", "all"):
        result = scores[half]
        metrics.update({f"dev_precision_{half}": result.precision, f"dev_recall_{half}": result.recall,
                        f"dev_f1_{half}": result.f1})
    metrics["dev_per_type"] = {t: round(c.f1, 4) for t, c in scores["all"].per_type.items()}
    b = scores["b"]
    return metrics, {"dev_precision_b": b.precision, "dev_recall_b": b.recall, "dev_f1_b": b.f1}


def _evaluate(model, halves: DevHalves, dev_candidates, dev_pairs, pad_id, device,
              precision) -> tuple[dict[str, Any], dict[str, float], torch.Tensor]:
    """Dev metrics, the held-out half-B figures, and the (candidates, labels) probabilities they come from."""
    probs = torch.zeros((1, len(dev_candidates), len(LABELS)))
    probs[0, :, 0] = 1.0
    if dev_pairs:
        probs[0, torch.tensor([p.index for p in dev_pairs])] = pair_probabilities(model, dev_pairs, pad_id=pad_id,
                                                                                  device=device, precision=precision)
    predictions = decode(dev_candidates, probs, decision=Decision(multilabel=model.multilabel))
    metrics, held_out = dev_metrics(halves, ((r.pmid, r.type, r.chemical, r.gene) for r in predictions))
    return metrics, held_out, probs[0]


def _fgemr(config: RunConfig, tokenizer, train_docs, dev_docs, checkpoint: _Checkpoint | None, device,
           say: Callable[[str], None]):
    """Train (or restore) the gene typer and give dev genes their predicted fine types."""
    from drugprot.fgemr import apply_gene_types, predict_gene_types

    cfg = config.train
    encoder = build_encoder(config.encoder.name, tiny=config.encoder.tiny, seed=cfg.seed + 1)
    encoder.resize_token_embeddings(len(tokenizer))
    restored = None
    if checkpoint is not None:
        restored = GeneTypeClassifier(encoder, dropout=config.model.dropout).to(device)
        if not checkpoint.load_gene_typer(restored):
            restored = None
    if restored is not None:
        typer = restored
        extra = json.loads((checkpoint.folder / "state.json").read_text()).get("extra", {})
    else:
        typer, extra = train_gene_typer(config, encoder, tokenizer, train_docs, device=device)
        say(f"FGEMR gene typer: held-out accuracy {extra['gene_typer_accuracy']:.4f} on "
            f"{extra['gene_typer_holdout_genes']} genes")
    predicted = predict_gene_types(typer, tokenizer, dev_docs, device=device, max_length=config.encoder.max_length,
                                   precision=cfg.precision)
    return typer, apply_gene_types(dev_docs, predicted), extra


def train_gene_typer(config: RunConfig, encoder, tokenizer, documents: list[Document], *,
                     device: torch.device) -> tuple[GeneTypeClassifier, dict]:
    """FGEMR's GENE-Y/GENE-N classifier on the training genes minus a held-out share of documents (whose accuracy it
    reports), through :func:`train_step` and the non-finite guard like the relation model: weight decay, warm-up,
    clipping and precision from ``train``, epochs, learning rate and held-out share from ``fgemr``."""
    from drugprot.fgemr import collate_genes, gene_examples, holdout_report, split_holdout

    cfg = config.train
    held, used = split_holdout(documents, config.fgemr.holdout, cfg.seed)
    examples = [e for e in gene_examples(used, tokenizer, config.encoder.max_length) if e.label >= 0]
    if not examples:
        raise DrugprotError("model.system fgemr: the training split has no GENE-Y/GENE-N genes to learn from")
    typer = GeneTypeClassifier(encoder, dropout=config.model.dropout).to(device)
    optimizer = build_optimizer(typer, lr=config.fgemr.lr, weight_decay=cfg.weight_decay, device=device)
    per_epoch = token_budget_batches(examples, token_budget=cfg.token_budget, max_pairs=cfg.max_batch_pairs)
    total = max(1, int(round(config.fgemr.epochs * len(per_epoch))))
    scheduler = linear_schedule(optimizer, total_steps=total, warmup_steps=int(cfg.warmup * total))
    guard = _NonFiniteGuard(cfg.max_nonfinite_steps, device)

    def loss(batch) -> torch.Tensor:
        ids, mask, position, label = batch
        return torch.nn.functional.cross_entropy(typer(ids, mask, position).float(), label)

    step = epoch = 0
    while step < total:
        for members in token_budget_batches(examples, token_budget=cfg.token_budget, max_pairs=cfg.max_batch_pairs,
                                            shuffle_seed=cfg.seed * 1000 + epoch):
            if step >= total:
                break
            batch = tuple(t.to(device) for t in collate_genes([examples[i] for i in members], tokenizer.pad_token_id))
            value, nonfinite = train_step(typer, batch, optimizer, scheduler, device=device, precision=cfg.precision,
                                          grad_clip=cfg.grad_clip, loss_fn=loss)
            step += 1
            guard.update(value, nonfinite)
            try:
                guard.check(step, config, force=step == total)
            except NonFiniteTraining as error:
                raise NonFiniteTraining(f"FGEMR gene typer (its rate is fgemr.lr={config.fgemr.lr}): {error}") from None
        epoch += 1
    return typer, holdout_report(typer, tokenizer, held, device=device, max_length=config.encoder.max_length,
                                 precision=cfg.precision, steps=total)


def _progress(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="step", file=sys.stderr, mininterval=2.0, dynamic_ncols=True)


