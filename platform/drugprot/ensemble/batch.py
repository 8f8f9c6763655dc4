"""Batch prediction with Ray Data: ``drugprot predict --ray``.

Documents become rows of a Ray Dataset; ``map_batches`` runs :class:`EnsemblePredictor` in a pool of actors,
each loading the model (single model or ensemble, stacked when possible) **once** in ``__init__`` and
predicting a batch of documents per ``__call__`` through the same :class:`~drugprot.inference.Predictor` as the
local path, so the relations are the same. Each actor takes one GPU when the cluster has GPUs and the device
is not ``cpu``. Results are put back in the input order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from drugprot.corpus import Document


class EnsemblePredictor:
    """Ray Data callable class: holds a Predictor; maps a batch ``{"index", "document"}`` to ``{"index", "relations"}``."""

    def __init__(self, model: str, *, device: str = "auto", tracking_uri: str | None = None,
                 interval: tuple[int, int] | None = None, threshold: float = 0.0, threads: int | None = None,
                 options: dict[str, Any] | None = None):
        """``options``: more ``load_predictor`` keywords (``drugprot.inference.run_options``)."""
        import torch

        from drugprot.inference import load_predictor

        if threads:
            torch.set_num_threads(threads)
        self.predictor = load_predictor(model, device=device, tracking_uri=tracking_uri, **(options or {}))
        self.interval = tuple(interval) if interval else None
        self.threshold = threshold

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from drugprot.ensemble.frames import document_from_record

        documents = [document_from_record(json.loads(text), f"document {int(i)}")
                     for i, text in zip(batch["index"], batch["document"])]
        predictions = self.predictor.predict(documents, interval=self.interval, threshold=self.threshold)
        relations = [json.dumps([[p.pmid, p.chemical, p.gene, p.type, p.score, list(p.votes)] for p in preds])
                     for preds in predictions]
        return {"index": np.asarray(batch["index"]), "relations": np.asarray(relations, dtype=object)}


def predict_with_ray(model: str, documents: Sequence[Document], *, device: str = "auto", tracking_uri: str | None = None,
                     interval: tuple[int, int] | None = None, threshold: float = 0.0, batch_size: int = 16,
                     actors: int = 1, address: str | None = None, num_cpus: int | None = None,
                     options: dict[str, Any] | None = None):
    """Relations per document (input order) predicted by ``actors`` Ray actors; same output as ``Predictor.predict``.

    ``model`` is what ``drugprot predict --model`` takes (a folder or ``models:/NAME@ALIAS``); a registry URI is
    resolved once here (errors surface before Ray starts) and each actor loads from the local cache. ``options``:
    the actors' ``load_predictor`` keywords (precision, cascade margin, early exit; checked here first).
    """
    import ray
    from ray.data import ActorPoolStrategy

    from drugprot.ensemble.frames import document_record
    from drugprot.inference import PredictedRelation, early_exit_for

    from drugprot.registry import resolve_model_folder

    model = str(resolve_model_folder(model, tracking_uri=tracking_uri))
    early_exit_for(model, (options or {}).get("early_exit"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    if not ray.is_initialized():
        if address:
            from drugprot.local_ray import keep_loopback_address

            keep_loopback_address(address)
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            from drugprot.local_ray import start_local_ray

            start_local_ray(num_cpus=num_cpus)
        started = True
    try:
        gpus = ray.cluster_resources().get("GPU", 0) if device != "cpu" else 0
        per_actor_gpu = 1 if gpus >= 1 else 0
        if device == "cuda" and not per_actor_gpu:
            from drugprot.errors import DrugprotError

            raise DrugprotError("--device cuda --ray: the Ray cluster has no GPU (use --device auto or cpu)")
        rows = [{"index": i, "document": json.dumps(document_record(d))} for i, d in enumerate(documents)]
        if not rows:
            return []
        dataset = ray.data.from_items(rows)
        predicted = dataset.map_batches(
            EnsemblePredictor, batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=max(1, actors)),
            num_gpus=per_actor_gpu, num_cpus=1,
            fn_constructor_kwargs={"model": str(model), "device": device if per_actor_gpu else "cpu",
                                   "tracking_uri": tracking_uri, "interval": interval, "threshold": threshold,
                                   "threads": None if per_actor_gpu else 1, "options": options})
        by_index: dict[int, list[PredictedRelation]] = {}
        for row in predicted.take_all():
            by_index[int(row["index"])] = [PredictedRelation(pmid, chem, gene, rtype, float(score), tuple(votes))
                                           for pmid, chem, gene, rtype, score, votes in json.loads(row["relations"])]
        missing = [i for i in range(len(documents)) if i not in by_index]
        if missing:
            raise RuntimeError(f"Ray Data returned no result for {len(missing)} document(s), e.g. index {missing[0]}")
        return [by_index[i] for i in range(len(documents))]
    finally:
        if started:
            ray.shutdown()
