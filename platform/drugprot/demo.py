"""``make demo``: the whole pipeline on the bundled sample with the real offline MiniLM encoder, on CPU.

Each step runs the same ``drugprot`` command a user would type (printed before it runs): a small Ray Tune study
tracked in SQLite MLflow, an ensemble chosen on dev half A and registered in MLflow (``champion`` if it passes the
promotion gates), the Ray Serve app on 127.0.0.1, one real development abstract sent over HTTP, the relations found
printed next to the gold ones.
Everything lands in ``runs/demo/`` (recreated on each run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from drugprot.environment import quiet_defaults

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "runs" / "demo"
TRACKING = f"sqlite:///{WORK / 'mlflow.db'}"
MODEL_NAME = "drugprot-demo"
STUDY = "demo"
TRIALS = 2  # one per core: two trials at once finish sooner on 2 cores than three sharing them


def _step(number: int, title: str) -> None:
    print(f"\n=== step {number}: {title} ===", flush=True)


def _run(*args: str) -> None:
    command = ["drugprot", *args]
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "drugprot", *args], cwd=REPO, check=True)
    print(f"(done in {time.perf_counter() - started:.0f} s)", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    from drugprot.polling import poll

    def ready() -> bool | None:
        if server.poll() is not None:
            raise RuntimeError(f"drugprot serve exited with code {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                return response.status == 200 or None
        except (urllib.error.URLError, OSError):
            return None

    if not poll(ready, timeout=timeout, interval=1.0):
        raise RuntimeError(f"the service at {url} was not ready within {timeout:.0f} s")


def _request(url: str, document, token: str) -> dict:
    body = {"documents": [{"id": document.pmid, "title": document.title, "abstract": document.abstract,
                           "entities": [{"id": e.id, "type": e.type, "start": e.start, "end": e.end, "text": e.text}
                                        for e in document.entities.values()]}]}
    print(f"$ curl -s -X POST {url}/v1/relations -H 'content-type: application/json' "
          f"-H \"Authorization: Bearer $(cat {WORK / 'serve' / 'api-token'})\" -d @abstract-{document.pmid}.json",
          flush=True)
    request = urllib.request.Request(f"{url}/v1/relations", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _compare(document, answer: dict) -> None:
    found = {(r["chemical"], r["gene"]): r for r in answer["documents"][0]["relations"]}
    gold = {(r.chemical, r.gene): r.type for r in document.relations}
    name = lambda eid: document.entities[eid].text  # noqa: E731
    print(f"\nPMID {document.pmid}: {document.title}")
    print(f"{answer['documents'][0]['candidates']} candidate pairs scored; {len(gold)} gold, {len(found)} predicted\n")
    print(f"{'chemical':<28} {'gene':<28} {'gold':<24} {'predicted (score)':<30}")
    for pair in sorted(set(gold) | set(found), key=lambda p: (document.entities[p[0]].start, document.entities[p[1]].start)):
        predicted = found.get(pair)
        shown = f"{predicted['type']} ({predicted['score']:.2f})" if predicted else "-"
        mark = "  ok" if predicted and predicted["type"] == gold.get(pair) else ""
        print(f"{name(pair[0])[:27]:<28} {name(pair[1])[:27]:<28} {gold.get(pair, '-'):<24} {shown:<30}{mark}")


def majority_baseline() -> tuple[str, float]:
    """The commonest training relation type, and the dev F1 of labelling every candidate pair with it.

    On 10 development abstracts this rule is a real competitor (half their candidate pairs are related, 29 of 71
    relations are INHIBITOR), so the demo prints it next to the champion: a model that only beats it by a little has
    learned little."""
    from collections import Counter

    from drugprot.candidates import corpus_candidates
    from drugprot.config import SAMPLE_DIR
    from drugprot.corpus import read_split
    from drugprot.scoring import score

    training = read_split(SAMPLE_DIR, "training").documents
    commonest = Counter(r.type for d in training for r in d.relations).most_common(1)[0][0]
    development = read_split(SAMPLE_DIR, "development").documents
    candidates, _ = corpus_candidates(development)
    return commonest, score(development, [(c.pmid, commonest, c.chemical.id, c.gene.id) for c in candidates]).f1


def _champion_summary() -> None:
    """The champion's dev F1 next to the best trial's (the registry moved @champion only on a higher dev F1) and
    the majority rule's."""
    from drugprot import mlflow_store, tracking

    registry = mlflow_store.client(TRACKING)
    champion = registry.get_model_version_by_alias(MODEL_NAME, "champion")
    best = tracking.study_trials(STUDY, TRACKING)[0]
    commonest, baseline_f1 = majority_baseline()
    print(f"\n@champion is version {champion.version} ({champion.tags.get('members')}, "
          f"{champion.tags.get('vote')} vote): whole dev F1 {float(champion.tags['dev_f1']):.4f}, members chosen on half A; "
          f"best trial {best.trial_id}: dev F1 on half A {best.best_dev_f1_a:.4f}; for scale, labelling every candidate pair "
          f"{commonest} (the commonest training type) scores {baseline_f1:.4f}", flush=True)


def main() -> int:
    from drugprot.config import SAMPLE_DIR
    from drugprot.corpus import read_split

    started = time.perf_counter()
    quiet_defaults()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print("drugprot demo: tune → ensemble → register → serve → ask, on the bundled sample (40 training and 10 "
          "development abstracts)\nwith the offline MiniLM encoder on this machine's CPU. Output in runs/demo/.")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)

    _step(1, "the bundled sample")
    _run("data", "check")

    _step(2, "a small Ray Tune + Optuna + ASHA study, every trial an MLflow run")
    _run("tune", "--config", "configs/demo.yaml", "--space", "search_spaces/demo.yaml", "--name", STUDY,
         "--num-samples", str(TRIALS), "--max-concurrent", str(TRIALS), "--cpus-per-trial", "1",
         "--storage", str(WORK / "tune"), "--tracking-uri", TRACKING)

    _step(3, "register the best trial as champion, then challenge it with a soft-vote ensemble of the trials")
    _run("ensemble", "--study", STUDY, "--top-k", "1", "--register", MODEL_NAME, "--alias", "champion",
         "--tracking-uri", TRACKING, "--out", str(WORK / "best-trial"))
    _run("ensemble", "--study", STUDY, "--top-k", str(TRIALS), "--vote", "soft", "--register", MODEL_NAME,
         "--alias", "champion", "--tracking-uri", TRACKING, "--out", str(WORK / "ensemble"))
    _champion_summary()

    _step(4, "serve the champion with Ray Serve on 127.0.0.1")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = ["serve", "--model", f"models:/{MODEL_NAME}@champion", "--port", str(port), "--tracking-uri", TRACKING,
               "--max-batch-pairs", "32", "--run-dir", str(WORK / "serve")]
    print("$ drugprot " + " ".join(command), flush=True)
    env = {key: value for key, value in os.environ.items() if key != "DRUGPROT_API_TOKEN"}  # it makes its own token
    server = subprocess.Popen([sys.executable, "-m", "drugprot", *command], cwd=REPO, start_new_session=True, env=env)
    try:
        _wait_ready(url, server)
        print(f"ready at {url} (OpenAPI at {url}/openapi.json)")

        _step(5, "one development abstract over HTTP")
        document = max(read_split(SAMPLE_DIR, "development").documents, key=lambda d: len(d.relations))
        _compare(document, _request(url, document, (WORK / "serve" / "api-token").read_text().strip()))
    finally:
        _step(6, "stop the service")
        if server.poll() is None:
            # the server alone, as `kill PID` or Kubernetes would: a SIGTERM to its whole process group would also
            # stop its local Ray's GCS and raylet before it could drain (docs/serving.md)
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                print("the service did not stop within 60 s of SIGTERM: killing it", flush=True)
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        print(f"service stopped (exit code {server.returncode})")

    minutes = (time.perf_counter() - started) / 60
    print(f"\nDemo finished in {minutes:.1f} minutes. Browse the study, trials, plots and the registered ensemble with:\n"
          f"  .venv/bin/mlflow ui --backend-store-uri {TRACKING} --port 5000\n\n"
          "Quality: this run trains MiniLM for minutes on 40 abstracts, so it finds only the commonest relations. "
          "Real quality needs the full corpus\n(`drugprot data download`) and a GPU: see README, Results.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
