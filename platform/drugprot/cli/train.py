"""``drugprot train``: one training run from a YAML config."""

from __future__ import annotations

import json
from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser("train", help="Train one relation model; the best checkpoint lands in OUT/model.")
    parser.add_argument("--config", type=Path, help="YAML run config (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=3e-5 --set data.dir=PATH (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("runs/train"), help="run folder (model/, metrics.json, checkpoint/)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_train)


def _train(args) -> int:
    from drugprot.config import load_config
    from drugprot.model.artifacts import INFO
    from drugprot.training import train

    config = load_config(args.config, args.overrides)
    result = train(config, args.out, resume=args.resume, progress=not args.quiet)
    if result.final is not None:
        print(f"final model: trained on {result.final['trained_on']} documents for {result.final['steps']} steps, "
              f"no dev score; model in {result.model_dir}; what it trained on in {args.out / 'metrics.json'}")
        return 0
    best = result.best or {}
    held_out = (json.loads((result.model_dir / INFO).read_text()).get("dev") or {}) if best else {}
    print(f"best dev F1 on half A {result.best_f1:.4f} (P {best.get('dev_precision_a', 0):.4f}, "
          f"R {best.get('dev_recall_a', 0):.4f}) at epoch {best.get('epoch', 0)}, which chose it; "
          f"held-out half B F1 {held_out.get('dev_f1_b', 0):.4f}; whole dev F1 {best.get('dev_f1_all', 0):.4f}; "
          f"model in {result.model_dir}; every evaluation in {args.out / 'metrics.json'}")
    return 0
