"""The GPU mission's payload, cut to fit the device calls: what one call cannot carry travels in parts.

A device call carries the working tree plus at most 64 MiB, and the machine keeps what earlier calls left only while
it stays warm. So the staged folder (wheels, MiniLM, corpus) becomes one tar stream cut into parts that each fit one
call next to the tree; every call moves the part it carried into a stash folder on the machine, checked against the
manifest, and the last call joins the stash back into the folder and unpacks it.

    python bench/gpu_payload.py pack STAGE_DIR MISSION_DIR [--part-mib N]   # here (bench/prepare_gpu.sh runs it)
    python bench/gpu_payload.py stash MISSION_DIR STASH_DIR                 # there, in each call
    python bench/gpu_payload.py join MISSION_DIR STASH_DIR TARGET_DIR       # there, in the call that needs it all
    python bench/gpu_payload.py plan MISSION_DIR                            # the calls, their carries and seconds
    python bench/gpu_payload.py inventory FILE                              # there: cached models, packages, GPU

Standard library only: it runs on the GPU image before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

MIB = 2**20
CARRY_LIMIT = 64 * MIB  # the tree plus every carried path, per call
MANIFEST = "manifest.json"
LEASE_S = 15 * 60  # device time for a session, the machine's start included
START_S = 4 * 60  # starting the machine: at least this much of the lease
CALL_OVERHEAD_S = 20  # per call: the transfer and the wait before the next call (a planning figure, not a measurement)
RUN_TIMEOUT_LIMIT_S = 600  # one command's longest run


class PayloadError(Exception):
    """A part missing, damaged or too large: the message names the part and the call that carries it."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_bytes(repo: Path) -> int:
    """What every call carries besides its parts: tracked plus untracked, not ignored files."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True,
                            check=True).stdout.decode()
    return sum(os.path.getsize(repo / p) for p in listed.split("\0") if p and (repo / p).is_file())


def pack(stage: Path, mission: Path, *, part_bytes: int) -> dict:
    """Tar ``stage`` (its content, uncompressed: wheels and safetensors do not shrink) into ``mission/part-NN``."""
    if not stage.is_dir() or not any(stage.iterdir()):
        raise PayloadError(f"{stage}: nothing staged to pack")
    if part_bytes < 1:
        raise PayloadError(f"part size must be at least 1 byte, got {part_bytes}")
    shutil.rmtree(mission, ignore_errors=True)
    mission.mkdir(parents=True)
    stream = mission / "payload.tar"
    with tarfile.open(stream, "w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(stage.iterdir()):
            archive.add(path, arcname=path.name)
    parts = []
    with open(stream, "rb") as source:
        while block := source.read(part_bytes):
            part = mission / f"part-{len(parts):02d}"
            part.write_bytes(block)
            parts.append({"name": part.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    contents = {path.name: sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir()
                else path.stat().st_size for path in sorted(stage.iterdir())}
    manifest = {"parts": parts, "bytes": stream.stat().st_size, "sha256": sha256(stream), "contents": contents}
    stream.unlink()
    (mission / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(mission: Path) -> dict:
    path = mission / MANIFEST
    if not path.is_file():
        raise PayloadError(f"{path}: no payload manifest (run bench/prepare_gpu.sh here and carry {path} in every call)")
    return json.loads(path.read_text())


def stash(mission: Path, stash_dir: Path) -> list[str]:
    """Move each part this call carried into ``stash_dir`` once its checksum matches; the names moved."""
    manifest = read_manifest(mission)
    stash_dir.mkdir(parents=True, exist_ok=True)
    moved = []
    for call, part in enumerate(manifest["parts"], start=1):
        source = mission / part["name"]
        if not source.is_file():
            continue
        if sha256(source) != part["sha256"]:
            raise PayloadError(f"{source}: checksum differs from {mission / MANIFEST} (a broken transfer): "
                               f"rerun the call that carries {part['name']} (call {call})")
        shutil.copyfile(source, stash_dir / part["name"])  # a copy: the carried file may be replaced by the next call
        moved.append(part["name"])
    return moved


def join(mission: Path, stash_dir: Path, target: Path) -> dict:
    """Check every part is stashed, rebuild the tar stream, verify it and unpack it into ``target``."""
    manifest = read_manifest(mission)
    stash(mission, stash_dir)
    missing = [(call, p["name"]) for call, p in enumerate(manifest["parts"], start=1)
               if not (stash_dir / p["name"]).is_file() or (stash_dir / p["name"]).stat().st_size != p["bytes"]]
    if missing:
        raise PayloadError(f"{stash_dir}: parts missing: " + ", ".join(f"{name} (call {call})" for call, name in missing)
                           + "; the machine went cold between calls or a call was skipped: run the calls again from "
                             "the first")
    stream = stash_dir / "payload.tar"
    with open(stream, "wb") as out:
        for part in manifest["parts"]:
            with open(stash_dir / part["name"], "rb") as source:
                shutil.copyfileobj(source, out)
    if sha256(stream) != manifest["sha256"]:
        raise PayloadError(f"{stream}: the joined payload's checksum differs from the manifest's: run the calls again")
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(stream) as archive:
        archive.extractall(target, filter="data")
    stream.unlink()
    return manifest


def plan(mission: Path, repo: Path, caps: dict[str, int]) -> dict:
    """The calls in order: what each carries (measured here), its command, its expected seconds and the total.

    A call's seconds are CALL_OVERHEAD_S plus its command's: seconds for a stash, the caps' sum for the last call
    (``caps["MISSION_S"]`` bounds it). The total adds START_S for the machine's start.
    """
    manifest = read_manifest(mission)
    tree, head = tree_bytes(repo), (mission / MANIFEST).stat().st_size
    last = len(manifest["parts"])
    calls = []
    for number, part in enumerate(manifest["parts"], start=1):
        carry = [str(mission / MANIFEST), str(mission / part["name"])]
        if number == last:
            does = (f"stash {part['name']}, join the {last} parts, install (cap {caps['CAP_INSTALL']} s), "
                    f"a. tune (what the install leaves of the rest, at most {caps['CAP_TUNE']} s), "
                    f"b. ensemble (cap {caps['CAP_ENSEMBLE']} s), "
                    f"c. serve over HTTP (cap {caps['CAP_SERVE']} s), d. if time is left; all within "
                    f"{caps['MISSION_S']} s")
            command_s = caps["MISSION_S"]
        elif number == 1:
            does, command_s = f"record cached models, pip list and GPU (inventory.json); stash {part['name']}", 15
        else:
            does, command_s = f"stash {part['name']}", 5
        calls.append({"call": number, "carry": carry, "carry_bytes": tree + head + part["bytes"],
                      "command": f"bench/gpu_mission.sh --call {number}", "does": does,
                      "timeout_s": min(RUN_TIMEOUT_LIMIT_S, command_s + 40), "seconds": CALL_OVERHEAD_S + command_s})
    total = START_S + sum(c["seconds"] for c in calls)
    return {"calls": calls, "tree_bytes": tree, "contents": manifest["contents"], "start_s": START_S,
            "call_overhead_s": CALL_OVERHEAD_S, "total_s": total, "lease_s": LEASE_S, "carry_limit": CARRY_LIMIT,
            "fits": total < LEASE_S and all(c["carry_bytes"] < CARRY_LIMIT for c in calls)}


def print_plan(planned: dict) -> None:
    print(f"GPU mission: {len(planned['calls'])} calls, one after another within the machine's idle release; each "
          f"carries the tree ({planned['tree_bytes'] / MIB:.1f} MiB) and the paths below")
    print("payload: " + ", ".join(f"{name} {size / MIB:.1f} MiB" for name, size in planned["contents"].items()))
    for call in planned["calls"]:
        print(f"call {call['call']}: run(command='{call['command']}', carry={call['carry']}, "
              f"timeout_s={call['timeout_s']})")
        print(f"    carries {call['carry_bytes'] / MIB:.1f} MiB of {planned['carry_limit'] / MIB:.0f}; {call['does']}; "
              f"expected {call['seconds']} s")
    print(f"machine start {planned['start_s']} s + calls (each with {planned['call_overhead_s']} s for transfer and "
          f"the wait) = {planned['total_s']} s of {planned['lease_s']} s"
          + ("" if planned["fits"] else "  DOES NOT FIT: rerun bench/prepare_gpu.sh (it cuts the parts for the tree "
                                          "as it is now) or lower the caps"))
    print(json.dumps(planned))


def inventory(path: Path) -> dict:
    """What the GPU machine holds before the mission: cached models (a biomedical encoder changes what can be
    measured), the Python packages and the GPU."""
    import importlib.metadata
    import platform
    import time

    homes = {os.environ.get(v) for v in ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "SENTENCE_TRANSFORMERS_HOME")}
    roots = [Path(p) for p in homes if p] + [Path.home() / ".cache", Path("/models"), Path("/data"), Path("/opt"),
                                               Path("/workspace"), Path("/mnt"), Path("/root"), Path("/home")]
    deadline = time.monotonic() + 30
    models, seen = [], set()
    for root in roots:
        for folder, dirs, files in os.walk(root) if root.is_dir() else ():
            depth = len(Path(folder).relative_to(root).parts)
            if time.monotonic() > deadline or depth >= 7 or "site-packages" in folder or "/proc" in folder:
                dirs.clear()
                continue
            if "config.json" in files and any(f.endswith((".safetensors", ".bin", ".pt")) for f in files):
                real = os.path.realpath(folder)
                if real in seen:
                    continue
                seen.add(real)
                try:
                    config = json.loads(Path(folder, "config.json").read_text())
                except (OSError, ValueError):
                    config = {}
                size = sum(os.path.getsize(os.path.join(folder, f)) for f in files if os.path.isfile(os.path.join(folder, f)))
                models.append({"path": folder, "model_type": config.get("model_type"),
                               "architectures": config.get("architectures"), "name": config.get("_name_or_path"),
                               "bytes": size})
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    found = {"models": models, "search_complete": time.monotonic() <= deadline,
             "roots": [str(r) for r in roots if r.is_dir()], "python": platform.python_version(),
             "cpus": os.cpu_count(), "gpu": gpu.stdout.strip() if gpu else None,
             "packages": sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())}
    path.write_text(json.dumps(found, indent=1))
    print(f"gpu_payload: {len(models)} cached model folder(s)" + "".join(f"\n  {m['path']} ({m['model_type']}, "
          f"{m['name']}, {m['bytes'] / MIB:.0f} MiB)" for m in models) + f"\n  GPU {found['gpu']}; "
          f"{len(found['packages'])} packages; recorded in {path}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    packing = verbs.add_parser("pack")
    packing.add_argument("stage", type=Path)
    packing.add_argument("mission", type=Path)
    packing.add_argument("--part-mib", type=float, default=None,
                         help="bytes per part in MiB (default: what one call holds beside the tree, less 1 MiB)")
    stashing = verbs.add_parser("stash")
    stashing.add_argument("mission", type=Path)
    stashing.add_argument("stash", type=Path)
    joining = verbs.add_parser("join")
    joining.add_argument("mission", type=Path)
    joining.add_argument("stash", type=Path)
    joining.add_argument("target", type=Path)
    planning = verbs.add_parser("plan")
    planning.add_argument("mission", type=Path)
    taking_stock = verbs.add_parser("inventory")
    taking_stock.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    try:
        if args.verb == "pack":
            part = (int(args.part_mib * MIB) if args.part_mib is not None
                    else CARRY_LIMIT - tree_bytes(repo) - 2 * MIB)  # the manifest and room for the tree to grow
            manifest = pack(args.stage, args.mission, part_bytes=part)
            print(f"gpu_payload: {manifest['bytes'] / MIB:.1f} MiB in {len(manifest['parts'])} parts of at most "
                  f"{part / MIB:.1f} MiB in {args.mission}")
        elif args.verb == "stash":
            moved = stash(args.mission, args.stash)
            print(f"gpu_payload: stashed {', '.join(moved) or 'no part'} in {args.stash}")
        elif args.verb == "join":
            manifest = join(args.mission, args.stash, args.target)
            print(f"gpu_payload: joined {len(manifest['parts'])} parts ({manifest['bytes'] / MIB:.1f} MiB, checksum "
                  f"verified) into {args.target}: {', '.join(manifest['contents'])}")
        elif args.verb == "plan":
            caps = {name: int(os.environ[name]) for name in ("CAP_INSTALL", "CAP_TUNE", "CAP_ENSEMBLE", "CAP_SERVE",
                                                             "MISSION_S")}
            print_plan(plan(args.mission, repo, caps))
        else:
            inventory(args.file)
    except PayloadError as error:
        print(f"gpu_payload: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
