"""Prediction over corpora of any size: streaming, sharded, resumable; in one process or on Ray Data (the one Ray
Data path of ``drugprot predict --ray``, for ``--input`` corpora and ``--data`` splits alike).

Input files are read lazily, one after another; each file's documents are cut into shards of ``shard_size``
documents, named ``part-FFFFF-SSSSS`` (file number, shard number within the file). Each shard's output file is
written atomically (temporary file, fsync, rename) and then recorded in ``OUT/manifest.json`` (also replaced
atomically) with its counts, first and last PMID and sha256. A rerun of the same command reads the manifest and
skips every finished shard, so a killed job resumes where it stopped and its output is byte-identical to an
uninterrupted run: a shard's bytes depend on its documents and the model alone, and documents are predicted in
fixed chunks of :data:`CHUNK_DOCUMENTS`, whatever runs them. Memory holds one shard at a time (per Ray actor
with ``--ray``), so it does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from drugprot.corpus import Document
from drugprot.errors import DrugprotError
from drugprot.formats import OUTPUT_SUFFIX, ReadStats, input_files, read_documents, render
from drugprot.inference.options import InferenceOptions

MANIFEST = "manifest.json"
CHUNK_DOCUMENTS = 64  # documents per Predictor.predict call: fixed, so every run batches pairs the same way


@dataclass(frozen=True)
class BulkJob:
    """What a run predicts and how; a rerun into the same folder must agree on all of it."""

    inputs: tuple[str, ...]
    input_format: str
    output_format: str = "tsv"
    shard_size: int = 1000
    model: str = ""
    threshold: float = 0.0
    options: InferenceOptions = field(default_factory=InferenceOptions)

    def settings(self) -> dict:
        """What the manifest records: the job's fields with the inference options among them."""
        own = {name: getattr(self, name) for name in ("input_format", "output_format", "shard_size", "model", "threshold")}
        return {"inputs": list(self.inputs), **own, **self.options.model_dump(mode="json")}


@dataclass
class Shard:
    name: str
    documents: list[Document]
    read: ReadStats  # what reading this shard's documents counted (skipped mention types)


@dataclass
class BulkSummary:
    out: str
    documents: int = 0
    pairs: int = 0
    relations: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    skipped_types: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def iter_shards(job: BulkJob, files: Sequence[Path]) -> Iterator[Shard]:
    """The job's documents in shards, file by file; each file is read lazily."""
    for file_number, path in enumerate(files):
        yield from _file_shards(file_number, path, job)


def _file_shards(file_number: int, path: Path, job: BulkJob) -> Iterator[Shard]:
    stats = ReadStats()
    documents: list[Document] = []
    shard_number = 0
    for document in read_documents(path, job.input_format, stats):
        documents.append(document)
        if len(documents) == job.shard_size:
            yield Shard(f"part-{file_number:05d}-{shard_number:05d}", documents, stats)
            stats, documents, shard_number = ReadStats(), [], shard_number + 1
    if documents:
        yield Shard(f"part-{file_number:05d}-{shard_number:05d}", documents, stats)


def predict_documents(predictor, documents: Sequence[Document], *, threshold: float = 0.0,
                      on_pairs: Callable[[int], None] | None = None) -> tuple[list[list], int]:
    """Relations per document and the number of candidate pairs, predicted in chunks of CHUNK_DOCUMENTS
    (``on_pairs`` hears each chunk's pair count: the progress bar)."""
    predictions: list[list] = []
    pairs = 0
    for start in range(0, len(documents), CHUNK_DOCUMENTS):
        chunk = documents[start:start + CHUNK_DOCUMENTS]
        job = predictor.plan.prepare(chunk)
        relations = predictor.plan.decode(job, predictor.scorer.probabilities(job, skip_settled=True), threshold)
        predictions.extend(predictor.plan.by_document(chunk, relations))
        pairs += job.pairs
        if on_pairs is not None:
            on_pairs(job.pairs)
    return predictions, pairs


def shard_output(predictor, shard: Shard, job: BulkJob, on_pairs=None) -> dict:
    """One shard's output bytes and manifest entry."""
    predictions, pairs = predict_documents(predictor, shard.documents, threshold=job.threshold, on_pairs=on_pairs)
    data = render(shard.documents, predictions, job.output_format)
    return {"name": shard.name, "data": data, "documents": len(shard.documents), "pairs": pairs,
            "relations": sum(len(p) for p in predictions), "first": shard.documents[0].pmid,
            "last": shard.documents[-1].pmid}


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, and rename it into place."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ShardManifest:
    """``OUT/manifest.json``: the job's settings and every finished shard; refuses a folder of another job."""

    def __init__(self, out: Path, job: BulkJob):
        self.out = Path(out)
        self.path = self.out / MANIFEST
        self.settings = job.settings()
        self.suffix = OUTPUT_SUFFIX[job.output_format]
        self.shards: dict[str, dict] = {}
        if self.path.exists():
            try:
                recorded = json.loads(self.path.read_text())
            except ValueError as error:
                raise DrugprotError(f"{self.path}: not a readable manifest ({error}); remove it or use another --out") from None
            changed = {k: (recorded.get("settings", {}).get(k), v) for k, v in self.settings.items()
                       if recorded.get("settings", {}).get(k) != v}
            if changed:
                key, (old, new) = next(iter(changed.items()))
                raise DrugprotError(f"{self.out} holds the output of another job ({key}: {old!r} there, {new!r} now); "
                                    f"rerun with the same options or use another --out")
            self.shards = recorded.get("shards", {})
        elif self.out.exists() and any(self.out.iterdir()):
            raise DrugprotError(f"--out {self.out}: folder is not empty and has no {MANIFEST}; use an empty or new folder")
        else:  # written first, so a run killed at any later moment leaves a folder its rerun accepts
            self.out.mkdir(parents=True, exist_ok=True)
            self._save()
        for stale in self.out.glob(".*.tmp"):  # left by a killed run mid-write (write_atomic's temporary files)
            stale.unlink()

    def finished(self, shard_name: str, first: str, last: str) -> bool:
        """True when the shard is recorded, its file is intact and it covers the same documents."""
        entry = self.shards.get(shard_name)
        if entry is None:
            return False
        file = self.out / entry["file"]
        if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != entry["sha256"]:
            return False
        if (entry["first"], entry["last"]) != (first, last):
            raise DrugprotError(f"{file}: the input changed since it was written (it covers PMIDs {entry['first']}…"
                                f"{entry['last']}, the input now gives {first}…{last}); use another --out")
        return True

    def record(self, output: dict) -> None:
        """Write the shard's file, then the manifest naming it (so a crash between them only redoes the shard)."""
        file = f"{output['name']}{self.suffix}"
        write_atomic(self.out / file, output["data"])
        self.shards[output["name"]] = {"file": file, "sha256": hashlib.sha256(output["data"]).hexdigest(),
                                       **{k: output[k] for k in ("documents", "pairs", "relations", "first", "last")}}
        self._save()

    def _save(self) -> None:
        body = {"settings": self.settings, "shards": dict(sorted(self.shards.items()))}
        write_atomic(self.path, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def _tally(summary: BulkSummary, entry: dict, stats: ReadStats, written: bool) -> None:
    summary.documents += entry["documents"]
    summary.pairs += entry["pairs"]
    summary.relations += entry["relations"]
    summary.shards_written += written
    summary.shards_skipped += not written
    summary.skipped_types = dict(sorted((Counter(summary.skipped_types) + stats.skipped_types).items()))


def predict_corpus(predictor, job: BulkJob, out: Path, *, on_pairs: Callable[[int], None] | None = None) -> BulkSummary:
    """Stream ``job``'s documents through ``predictor`` in this process; finished shards are skipped."""
    files = input_files(job.inputs, job.input_format)
    manifest = ShardManifest(out, job)
    summary = BulkSummary(str(out))
    for shard in iter_shards(job, files):
        if manifest.finished(shard.name, shard.documents[0].pmid, shard.documents[-1].pmid):
            entry = manifest.shards[shard.name]
            if on_pairs is not None:
                on_pairs(entry["pairs"])
            _tally(summary, entry, shard.read, written=False)
            continue
        output = shard_output(predictor, shard, job, on_pairs)
        manifest.record(output)
        _tally(summary, output, shard.read, written=True)
    return summary


def _read_file_shards(batch, *, job: BulkJob, intact: dict[str, tuple[str, str]]):
    """Ray Data stage: input files in, their shards out (a generator, so a file's shards stream one by one);
    a finished shard travels without its documents."""
    for file_number, path in zip(batch["file_number"], batch["path"]):
        for shard in _file_shards(int(file_number), Path(path), job):
            span = (shard.documents[0].pmid, shard.documents[-1].pmid)
            recorded = intact.get(shard.name)
            if recorded is not None and tuple(recorded) != span:
                raise DrugprotError(f"{shard.name}: the input changed since it was written (it covers PMIDs "
                                    f"{recorded[0]}…{recorded[1]}, the input now gives {span[0]}…{span[1]})")
            yield _shard_row(shard, finished=recorded is not None)


def _shard_row(shard: Shard, *, finished: bool = False) -> dict:
    """A shard as a Ray Data row (a finished one without its documents)."""
    from drugprot.records import document_record

    records = [] if finished else [document_record(d) for d in shard.documents]
    return {"name": [shard.name], "finished": [finished], "records": [json.dumps(records)],
            "skipped_types": [json.dumps(dict(shard.read.skipped_types))]}


class ShardPredictor:
    """Ray Data actor: loads the model once; predicts each unfinished shard into its output bytes."""

    def __init__(self, job: BulkJob, device: str, threads: int | None):
        import torch

        from drugprot.inference.loading import load_predictor

        if threads:
            torch.set_num_threads(threads)
        self.job = job
        self.predictor = load_predictor(job.model, device=device, options=job.options)

    def __call__(self, row: dict) -> dict:
        from drugprot.records import document_from_record

        base = {"name": row["name"], "finished": row["finished"], "skipped_types": row["skipped_types"]}
        if row["finished"]:
            return {**base, "data": b"", "documents": 0, "pairs": 0, "relations": 0, "first": "", "last": ""}
        documents = [document_from_record(r, f"{row['name']}: document {i}") for i, r in enumerate(json.loads(row["records"]))]
        return {**base, **shard_output(self.predictor, Shard(row["name"], documents, ReadStats()), self.job)}


@contextmanager
def _ray_cluster(device: str, address: str | None, num_cpus: int | None):
    """Ray started (or joined) for one run and stopped again if started here; yields the GPUs each actor takes."""
    import ray

    started = not ray.is_initialized()
    if started and address:
        from drugprot.local_ray import keep_loopback_address

        keep_loopback_address(address)
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    elif started:  # a private local Ray, on 127.0.0.1 only
        from drugprot.local_ray import start_local_ray

        start_local_ray(num_cpus=num_cpus)
    try:
        gpus = 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
        if device == "cuda" and not gpus:
            raise DrugprotError("--device cuda --ray: the Ray cluster has no GPU (use --device auto or cpu)")
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield gpus
    finally:
        if started:
            ray.shutdown()


def _predicted(shards, job: BulkJob, *, gpus: int, actors: int):
    """Each shard row through :class:`ShardPredictor` actors (one model each, a GPU each when there are GPUs)."""
    from ray.data import ActorPoolStrategy

    return shards.map(ShardPredictor, compute=ActorPoolStrategy(size=max(1, actors)), num_gpus=gpus,
                      num_cpus=0 if gpus else 1,
                      fn_constructor_kwargs={"job": job, "device": "cuda" if gpus else "cpu",
                                             "threads": None if gpus else 1}).iter_rows()


def predict_corpus_with_ray(job: BulkJob, out: Path, *, device: str = "auto", actors: int = 1, address: str | None = None,
                            num_cpus: int | None = None, on_pairs: Callable[[int], None] | None = None) -> BulkSummary:
    """The same shards as :func:`predict_corpus`, with reading and prediction spread over Ray Data: files are read
    in tasks, shards predicted by ``actors`` actors, and this process only writes the finished shards as they
    stream back. ``job.model`` must be a local folder."""
    import ray

    from drugprot.inference.loading import early_exit_for

    early_exit_for(job.model, job.options.early_exit)  # before Ray: the actors would only say it in their logs
    files = input_files(job.inputs, job.input_format)
    manifest = ShardManifest(out, job)
    intact = {name: (entry["first"], entry["last"]) for name, entry in manifest.shards.items()
              if manifest.finished(name, entry["first"], entry["last"])}
    summary = BulkSummary(str(out))
    if not files:
        return summary
    with _ray_cluster(device, address, num_cpus) as gpus:
        shards = ray.data.from_items([{"file_number": i, "path": str(p)} for i, p in enumerate(files)],
                                     override_num_blocks=len(files))
        # num_cpus=0 (the actors take 1) keeps Ray Data from fusing reading into the actors, so the shards of one
        # large file spread over every actor instead of queueing behind the actor that reads the file.
        shards = shards.map_batches(_read_file_shards, fn_kwargs={"job": job, "intact": intact}, batch_size=1, num_cpus=0)
        for row in _predicted(shards, job, gpus=gpus, actors=actors):
            stats = ReadStats(skipped_types=Counter(json.loads(row["skipped_types"])))
            if row["finished"]:
                entry = manifest.shards[row["name"]]
                _tally(summary, entry, stats, written=False)
            else:
                entry = {k: row[k] for k in ("name", "data", "documents", "pairs", "relations", "first", "last")}
                manifest.record(entry)
                _tally(summary, entry, stats, written=True)
            if on_pairs is not None:
                on_pairs(entry["pairs"])
        return summary


def predict_split_with_ray(documents: Sequence[Document], job: BulkJob, *, device: str = "auto", actors: int = 1,
                           address: str | None = None, num_cpus: int | None = None) -> tuple[bytes, int]:
    """A split's documents (``job.shard_size`` per shard) through the same actors as :func:`predict_corpus_with_ray`;
    the shards' output bytes joined in document order, and the number of candidate pairs."""
    import ray

    from drugprot.inference.loading import early_exit_for

    early_exit_for(job.model, job.options.early_exit)  # before Ray: the actors would only say it in their logs
    shards = [Shard(f"part-{n:05d}", list(documents[start:start + job.shard_size]), ReadStats())
              for n, start in enumerate(range(0, len(documents), job.shard_size))]
    if not shards:
        return b"", 0
    with _ray_cluster(device, address, num_cpus) as gpus:
        rows = ray.data.from_items([{k: v[0] for k, v in _shard_row(shard).items()} for shard in shards])
        outputs = {row["name"]: row for row in _predicted(rows, job, gpus=gpus, actors=actors)}
    missing = [shard.name for shard in shards if shard.name not in outputs]
    if missing:
        raise RuntimeError(f"Ray Data returned no result for {len(missing)} shard(s), e.g. {missing[0]}")
    return b"".join(outputs[s.name]["data"] for s in shards), sum(outputs[s.name]["pairs"] for s in shards)
