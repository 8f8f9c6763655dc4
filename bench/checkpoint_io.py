"""What one study trial uploads to ``--storage``, and how long it spends saving: the bounded policy against
``checkpoint_every=1`` (and, with ``--legacy``, the old whole-run-folder upload at every evaluation), measured in
one run.

A BERT-base-sized random encoder (110M parameters; ``tiny-random`` with BERT-base dimensions, so no download)
trains on CPU for a few tiny steps per evaluation, for 20 evaluations (10 epochs, one every half epoch, as in
``configs/paper-biobert.yaml``). Each evaluation goes through the trial's own upload code
(:func:`drugprot.tuning.trainable.upload_evaluation`) into a local folder that stands in for the storage, with the
Tune part (persisting the reported checkpoint folder, keeping the newest) done by copying, as Tune does for a local
storage.

    python bench/checkpoint_io.py                 # BERT-base, 20 evaluations: needs ~10 GB of free disk, minutes
    python bench/checkpoint_io.py --layers 2      # a quicker look

Prints a table and one JSON line: bytes and seconds per trial for each policy, and ``bytes_ratio`` (every=1 over
the bounded policy; the issue's target is >= 4). ``--also-every N`` adds ``bytes_ratio_every-N`` (every=1 over
checkpoint_every=N), ``--legacy`` ``legacy_bytes_ratio`` (the old upload over the bounded policy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from drugprot.config import load_config  # noqa: E402
from drugprot.training import train  # noqa: E402
from drugprot.tuning.trainable import LatestFolder, upload_evaluation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Storage:
    """A local stand-in for the study storage that counts every byte written to it."""

    def __init__(self, root: Path):
        import pyarrow.fs

        self.root = root
        self.bytes = 0
        self.checkpoints = 0  # Tune checkpoints: resumable states (the whole run folder in the legacy policy)
        self.best_uploads = 0
        self.best_models = LatestFolder(pyarrow.fs.LocalFileSystem(), str(root / "best"))

    def report(self, metrics, folder) -> None:
        """Tune's part: persist the reported folder (the resumable state) as a new checkpoint, keep the newest."""
        if folder is None:
            return
        self.checkpoints += 1
        target = self.root / f"checkpoint_{self.checkpoints:06d}"
        shutil.copytree(folder, target)
        self.bytes += folder_bytes(target)
        for old in self.root.glob("checkpoint_*"):
            if old != target:
                shutil.rmtree(old)


def run(policy: str, config, work: Path) -> dict:
    storage = Storage(work / f"storage-{policy}")
    storage.root.mkdir(parents=True)
    run_dir = work / f"run-{policy}"
    saving = {"train_s": 0.0, "upload_s": 0.0}

    def report(metrics, folder) -> None:
        saving["train_s"] += metrics["save_s"]
        start = time.perf_counter()
        if policy == "legacy":  # the old trial: the whole run folder, model and resumable state, every evaluation
            storage.report(metrics, folder)
        else:
            upload_evaluation(metrics, folder, model_saved=metrics["model_saved"], state_saved=metrics["state_saved"],
                              best_models=storage.best_models, report=storage.report)
            if metrics["model_saved"]:
                storage.bytes += folder_bytes(storage.root / "best" / storage.best_models.latest())
                storage.best_uploads += 1
        saving["upload_s"] += time.perf_counter() - start

    every = None if policy == "bounded" else 1 if policy == "legacy" else int(policy.removeprefix("every-"))
    start = time.perf_counter()
    result = train(config, run_dir, report=report, progress=False, log=lambda _: None, checkpoint_every=every)
    wall = time.perf_counter() - start
    shutil.rmtree(run_dir)
    shutil.rmtree(storage.root)
    legacy = policy == "legacy"
    return {"policy": policy, "evaluations": len(result.evaluations), "bytes": storage.bytes,
            "model_uploads": storage.checkpoints if legacy else storage.best_uploads, "state_uploads": storage.checkpoints,
            "save_s": saving["train_s"], "upload_s": saving["upload_s"], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (12 = BERT-base)")
    parser.add_argument("--evaluations", type=int, default=20)
    parser.add_argument("--legacy", action="store_true", help="also measure the old whole-folder upload")
    parser.add_argument("--also-every", type=int, nargs="*", default=[],
                        help="also measure trials.checkpoint_every = N (e.g. 5: what a study can choose)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    tiny = {"hidden_size": 768, "num_hidden_layers": args.layers, "num_attention_heads": 12,
            "intermediate_size": 3072, "max_position_embeddings": 512}
    overrides = [f"encoder.tiny={json.dumps(tiny)}", "encoder.max_length=64", "train.token_budget=128",
                 "train.batch_pairs=2", "data.max_train_docs=1", "data.max_dev_docs=1", "train.eval_every=0.5",
                 f"train.epochs={args.evaluations / 2}", "train.lr=1e-4"]
    config = load_config(REPO / "configs" / "smoke.yaml", overrides)
    policies = ["bounded", "every-1"] + [f"every-{n}" for n in args.also_every] + (["legacy"] if args.legacy else [])
    work = args.work or Path(tempfile.mkdtemp(prefix="drugprot-ckpt-io-"))
    print(f"{'policy':<10}{'evals':>6}{'model up':>9}{'state up':>9}{'GB uploaded':>13}{'save s':>8}{'upload s':>9}",
          flush=True)
    rows = []
    try:
        for policy in policies:  # each row as soon as it is measured: a BERT-base run takes minutes per policy
            r = run(policy, config, work)
            rows.append(r)
            print(f"{r['policy']:<10}{r['evaluations']:>6}{r['model_uploads']:>9}{r['state_uploads']:>9}"
                  f"{r['bytes'] / 1e9:>13.2f}{r['save_s']:>8.1f}{r['upload_s']:>9.1f}", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    by = {r["policy"]: r for r in rows}
    summary = {"bench": "checkpoint_io", "layers": args.layers, "evaluations": args.evaluations,
               **{f"{p}_bytes": by[p]["bytes"] for p in by}, **{f"{p}_save_s": round(by[p]["save_s"], 2) for p in by},
               **{f"{p}_upload_s": round(by[p]["upload_s"], 2) for p in by},
               "bytes_ratio": round(by["every-1"]["bytes"] / by["bounded"]["bytes"], 3)}
    for policy in by:
        if policy.startswith("every-") and policy != "every-1":
            summary[f"bytes_ratio_{policy}"] = round(by["every-1"]["bytes"] / by[policy]["bytes"], 3)
    if "legacy" in by:
        summary["legacy_bytes_ratio"] = round(by["legacy"]["bytes"] / by["bounded"]["bytes"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
