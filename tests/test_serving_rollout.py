"""Canary and shadow rollouts (serving.rollout, the ingress's choice of model, the challenger's own application).

Cheap first: refused options and flags, the key rule, agreement counting, and both modes in one process (FastAPI's
TestClient around two ModelServices). Then real Ray Serve over HTTP on 127.0.0.1, one private Ray for the module
and three applications, each with its challenger in an application of its own:

* ``canary``: the ensemble registered as version 2 (``@champion``) and version 1 as challenger, 30 % canary;
* ``shadow``: the same two versions, shadow;
* ``broken``: one member's folder, with a copy whose weights were changed by one byte as challenger.

The page at ``/`` is checked there too, in headless Chromium, for the version it says answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import requests
from fastapi.testclient import TestClient
from fixtures_mlflow import _free_port
from fixtures_serving import deploy, document_json, headless_dom, http_server, one_doc, serve_cluster

from drugprot.errors import DrugprotError
from drugprot.polling import poll
from drugprot.serving.options import parse_options
from drugprot.serving.rollout import (KEY_HEADER, ROLE_HEADER, VERSION_HEADER, Agreement, Answering, Challenger,
                                      answer_headers, bucket)

NAME = "drugprot-rollout-test"
CONTENT_TYPE = "Content-Type"
PERCENT = 30


# ---- options and flags ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    ({"rollout": {"canary_percent": 10}}, r"serve args: rollout.challenger: Field required"),
    ({"rollout": {"shadow": True}}, r"serve args: rollout.challenger: Field required"),
    ({"rollout": {"challenger": "c", "canary_percent": 101}},
     r"serve args: rollout.canary_percent: Input should be less than or equal to 100, got 101"),
    ({"rollout": {"challenger": "c", "canary_percent": -1}},
     r"serve args: rollout.canary_percent: Input should be greater than or equal to 0, got -1"),
    ({"rollout": {"challenger": "c", "canary_percent": 20, "shadow": True}},
     r"serve args: rollout: canary_percent and shadow exclude each other .* give canary_percent 20 or shadow"),
    ({"rollout": {"challenger": "c", "shadow": True, "shadow_timeout_s": 0}},
     r"serve args: rollout.shadow_timeout_s: Input should be greater than 0, got 0"),
    ({"rollout": {"challenger": "c", "canary": 5}}, r"serve args: rollout.canary: Extra inputs are not permitted"),
    ({"model": "models:/dp@champion", "follow_alias": True, "rollout": {"challenger": "c", "shadow": True}},
     r"serve args: follow_alias and rollout exclude each other"),
])
def test_bad_rollout_options_are_refused_naming_the_option(args, message):
    with pytest.raises(DrugprotError, match=message):
        parse_options({"model": "m", **args})


@pytest.mark.parametrize("flags, message", [
    (["--canary-percent", "10"], "--canary-percent: needs --challenger"),
    (["--shadow"], "--shadow: needs --challenger"),
    (["--challenger", "c", "--canary-percent", "150"],
     "option: rollout.canary_percent: Input should be less than or equal to 100, got 150"),
    (["--challenger", "c", "--canary-percent", "5", "--shadow"],
     "option: rollout: canary_percent and shadow exclude each other"),
])
def test_cli_rollout_flags_are_checked_as_usage(flags, message, capsys):
    from drugprot.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "m", *flags])
    assert exit_.value.code == 2
    assert f"drugprot serve: error: {message}" in capsys.readouterr().err


def test_cli_maps_the_rollout_flags_and_refuses_a_missing_challenger_folder(smoke_model_dir, tmp_path, capsys):
    from drugprot.cli import build_parser, main
    from drugprot.cli.serve import serve_options

    args = build_parser().parse_args(["serve", "--model", "m", "--challenger", "models:/dp@challenger", "--shadow",
                                      "--shadow-timeout-s", "2"])
    rollout = parse_options(serve_options(args)).rollout
    assert (rollout.challenger, rollout.shadow, rollout.shadow_timeout_s, rollout.mode) == (
        "models:/dp@challenger", True, 2.0, "shadow")
    assert main(["serve", "--model", str(smoke_model_dir), "--challenger", str(tmp_path / "nowhere"),
                 "--canary-percent", "5"]) == 1
    assert f"--challenger {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err


def test_options_for_the_model_deployments_leave_the_rollout_out():
    """Changing the rollout redeploys the ingress only: neither model deployment's arguments carry it."""
    options = parse_options({"model": "m", "rollout": {"challenger": "c", "canary_percent": 5}})
    assert options.without_rollout().rollout is None
    assert options.without_rollout(model="c").model == "c"
    from drugprot.serving import build_app, build_challenger

    ingress = build_app(options)
    assert ingress._bound_deployment.init_args[1]._bound_deployment.init_args[0]["rollout"] is None
    assert build_challenger(options)._bound_deployment.init_args[0]["model"] == "c"
    with pytest.raises(DrugprotError, match="build_challenger: serve args: rollout: missing"):
        build_challenger({"model": "m"})


# ---- the key rule and agreement ---------------------------------------------------------------------------------
def test_the_bucket_of_a_key_is_its_sha256_modulo_100():
    import hashlib

    for key in ("user-17", "", "ключ", "a" * 1000):
        assert bucket(key) == int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) % 100
    buckets = Counter(bucket(f"k{i}") for i in range(10_000))
    assert set(buckets) == set(range(100))  # every bucket is reachable


def test_agreement_counts_per_type_and_headers_name_the_answering_model():
    agreement = Agreement()
    counts = agreement.compare([("d", "T1", "T2", "INHIBITOR"), ("d", "T1", "T3", "SUBSTRATE")],
                               [("d", "T1", "T2", "INHIBITOR"), ("d", "T1", "T3", "PRODUCT-OF")])
    assert counts == {"INHIBITOR": {"agreed": 1}, "SUBSTRATE": {"champion_only": 1},
                      "PRODUCT-OF": {"challenger_only": 1}}
    agreement.calls["compared"] += 1
    summary = agreement.summary()
    assert summary["calls"] == {"compared": 1, "failed": 0, "timed_out": 0, "skipped": 0}
    assert summary["by_type"]["INHIBITOR"] == {"agreed": 1, "champion_only": 0, "challenger_only": 0,
                                               "agreement": 1.0}
    assert summary["by_type"]["SUBSTRATE"]["agreement"] == 0.0
    assert answer_headers(Answering("challenger", "3"), rollout=True) == {"X-Model-Version": "3",
                                                                        "X-Model-Role": "challenger"}
    assert answer_headers(Answering("champion", None), rollout=False) == {}


# ---- both modes in one process ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def in_process(relation_members):
    """Champion member 0, challenger member 1 (two opinionated tiny models that disagree), in this process."""
    from drugprot.inference import Predictor
    from drugprot.model.artifacts import load_artifact
    from drugprot.serving.service import ModelService

    models = []
    for path in relation_members[:2]:
        model = ModelService(Predictor([load_artifact(path)], device="cpu"),
                             parse_options({"model": str(path), "warmup_rounds": 1}))
        model.start_warmup().result(timeout=120)
        models.append(model)
    return models


def rollout_client(models, **rollout) -> TestClient:
    from drugprot.serving.api import create_api
    from drugprot.serving.service import RelationService

    champion, challenger = models
    options = parse_options({"model": "champion", "token_env": None, "max_queue_wait_s": 0,
                             "rollout": {"challenger": "challenger", **rollout}})
    service = RelationService(champion, options, challenger=Challenger(challenger, "challenger", state="ready"))
    client = TestClient(create_api(service))
    client.service = service
    return client


def test_in_process_a_key_always_reaches_the_side_its_bucket_names(in_process):
    with rollout_client(in_process, canary_percent=PERCENT) as client:
        for i in range(30):
            key = f"client-{i}"
            roles = {client.post("/v1/relations", json={"documents": [one_doc()]},
                                 headers={"X-Request-Key": key}).headers["X-Model-Role"] for _ in range(2)}
            assert roles == {"challenger" if bucket(key) < PERCENT else "champion"}, key
        info = client.get("/v1/model").json()
        assert info["rollout"] == {"mode": "canary", "canary_percent": PERCENT, "challenger": "challenger",
                                   "challenger_state": "ready", "challenger_error": None,
                                   "challenger_version": None, "shadow": None}


def test_in_process_a_failed_challenger_gets_no_traffic(in_process):
    with rollout_client(in_process, canary_percent=100) as client:
        client.service.challenger.state, client.service.challenger.error = "failed", "weights: sha256 mismatch"
        answers = [client.post("/v1/relations", json={"documents": [one_doc()]}) for _ in range(5)]
        assert {(a.status_code, a.headers["X-Model-Role"]) for a in answers} == {(200, "champion")}
        rollout = client.get("/v1/model").json()["rollout"]
        assert (rollout["challenger_state"], rollout["challenger_error"]) == ("failed", "weights: sha256 mismatch")


def test_in_process_shadow_answers_from_the_champion_and_counts_disagreement(in_process, dev_documents):
    documents = [document_json(d) for d in dev_documents[:6]]
    with rollout_client(in_process, shadow=True) as client:
        answers = [client.post("/v1/relations", json={"documents": [d]}) for d in documents]
        assert {a.headers["X-Model-Role"] for a in answers} == {"champion"}
        agreement = client.service.agreement
        assert poll(lambda: agreement.calls["compared"] == len(documents) or None, timeout=60)
    plain = rollout_client(in_process, canary_percent=0)
    with plain:
        alone = [plain.post("/v1/relations", json={"documents": [d]}) for d in documents]
    assert [a.content for a in answers] == [a.content for a in alone]  # the shadow changes no answer
    ours = {(d["id"], r["chemical"], r["gene"], r["type"]) for a in answers for d in a.json()["documents"]
            for r in d["relations"]}
    theirs = asyncio.run(_relations(in_process[1], dev_documents[:6]))
    want = Agreement().compare(ours, theirs)
    assert {t: dict(c) for t, c in agreement.by_type.items()} == {t: dict(c) for t, c in want.items()}
    assert any(c["champion_only"] or c["challenger_only"] for c in want.values())  # the two members disagree


async def _relations(model, documents) -> set[tuple]:
    plan = await model.plan()
    job = plan.prepare(documents)
    scored = await model.score(job)
    return {(r.pmid, r.chemical, r.gene, r.type) for r in plan.decode(job, scored.probabilities)}


def test_in_process_a_slow_challenger_is_abandoned_without_delaying_the_answer(in_process):
    """A challenger that never answers: the champion's answers come as before, the shadow call times out."""
    champion, _ = in_process

    class Stuck:
        async def plan(self):
            return await champion.plan()

        async def score(self, job):
            await asyncio.Event().wait()  # never set

    with rollout_client([champion, Stuck()], shadow=True, shadow_timeout_s=0.2) as client:
        answers = [client.post("/v1/relations", json={"documents": [one_doc()]}) for _ in range(3)]
        assert {a.status_code for a in answers} == {200}
        calls = client.service.agreement.calls
        assert poll(lambda: calls["timed_out"] == 3 or None, timeout=30), calls
        assert calls["compared"] == 0 and not client.service._shadows


# ---- real Ray Serve over HTTP -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(relation_members, tmp_path_factory):
    """One private Ray (2 CPUs) and Serve on a free port; the ensemble registered twice in a SQLite store (versions
    1 and 2, ``@champion`` on 2), one member and a broken copy of it; the three applications (module docstring)."""
    from drugprot.ensemble import build_ensemble
    from drugprot.ensemble.publish import log_ensemble

    root = tmp_path_factory.mktemp("rollout")
    ensemble = build_ensemble(relation_members, root / "ensemble", vote="soft", log=lambda _: None).path
    store = f"sqlite:///{root / 'mlflow.db'}"
    with contextlib.chdir(root):
        for _ in range(2):
            log_ensemble(ensemble, tracking_uri=store, register=NAME, force=True, log=lambda _: None)
    broken = root / "broken"
    shutil.copytree(relation_members[0], broken)
    weights = sorted(broken.rglob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    port = _free_port("8180-8199", "the rollout test's HTTP port")
    gcs = _free_port("6480-6489", "the rollout test's Ray")
    metrics = _free_port("6490-6499", "the rollout test's metrics port")
    # the replicas inherit the environment: registry downloads go to the test's cache, from the test's store
    env = {"DRUGPROT_CACHE_DIR": str(root / "cache"), "MLFLOW_TRACKING_URI": store}
    # warmup_rounds 0: what is checked here is which model answers, not how fast the first request is
    common = {"num_cpus": 0.2, "ingress_cpus": 0.1, "token_env": None, "warmup_rounds": 0, "max_queue_wait_s": 0,
              "max_batch_pairs": 160}
    registered = {**common, "model": f"models:/{NAME}@champion", "tracking_uri": store}
    with serve_cluster(port, gcs_port=gcs, env=env, prefix="drugprot-rollout-test-", _metrics_export_port=metrics):
        yield {**deploy(f"http://127.0.0.1:{port}", ensemble, {
            "canary": {**registered, "rollout": {"challenger": f"models:/{NAME}/1", "canary_percent": PERCENT}},
            "shadow": {**registered, "rollout": {"challenger": f"models:/{NAME}/1", "shadow": True}},
            "broken": {**common, "model": str(relation_members[0]),
                       "rollout": {"challenger": str(broken), "canary_percent": 50}},
        }), "metrics": f"http://127.0.0.1:{metrics}/metrics"}


def model_info(url: str) -> dict:
    return requests.get(f"{url}/v1/model", timeout=30).json()


def challenger_settled(url: str, state: str, timeout: float = 240) -> dict:
    """``/v1/model`` once the ingress sees the challenger in ``state``."""
    info = poll(lambda: (found := model_info(url))["rollout"]["challenger_state"] == state and found or None,
                timeout=timeout, interval=1.0)
    assert info, model_info(url)
    return info


def post(url: str, documents: list[dict], key: str | None = None) -> requests.Response:
    headers = {"X-Request-Key": key} if key is not None else {}
    return requests.post(f"{url}/v1/relations", json={"documents": documents}, headers=headers, timeout=120)


@pytest.mark.slow
def test_http_canary_share_is_within_tolerance_and_a_key_keeps_its_version(served):
    """400 keyless requests at 30 %: the challenger's count is Binomial(400, 0.3), mean 120, sd 9.2; the test allows
    ±37 (4 sd), which a correct split misses with probability about 6e-5. Every answer names its version
    (champion: registry version 2, challenger: version 1), and 40 keys sent twice each reach the side their bucket
    names both times."""
    url = served["canary"]
    info = challenger_settled(url, "ready")
    assert (info["version"], info["rollout"]["challenger_version"], info["rollout"]["mode"]) == ("2", "1", "canary")
    n = 400
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(url, [one_doc()]), range(n)))
    assert {a.status_code for a in answers} == {200}, Counter((a.status_code, a.text[:300]) for a in answers)
    seen = Counter((a.headers["X-Model-Role"], a.headers["X-Model-Version"]) for a in answers)
    assert set(seen) == {("champion", "2"), ("challenger", "1")}, seen
    assert abs(seen["challenger", "1"] - n * PERCENT / 100) <= 37, seen
    for i in range(40):
        key = f"user-{i}"
        versions = {post(url, [one_doc()], key).headers["X-Model-Version"] for _ in range(2)}
        assert versions == {"1" if bucket(key) < PERCENT else "2"}, key


@pytest.mark.slow
def test_http_shadow_answers_equal_the_champions_and_agreement_is_counted(served, dev_documents):
    """The same documents, one at a time, to the shadow application and (under a key that the canary sends to the
    champion) to the canary one: byte-equal bodies. Both versions are the same ensemble, so every relation is agreed."""
    shadow, canary = served["shadow"], served["canary"]
    challenger_settled(shadow, "ready")
    champion_key = next(f"k{i}" for i in range(100) if bucket(f"k{i}") >= PERCENT)
    documents = [document_json(d) for d in dev_documents[:5]]
    answers = [post(shadow, [d]) for d in documents]
    assert {(a.status_code, a.headers["X-Model-Role"], a.headers["X-Model-Version"]) for a in answers} == {
        (200, "champion", "2")}
    assert [a.content for a in answers] == [post(canary, [d], champion_key).content for d in documents]
    relations = Counter(r["type"] for a in answers for d in a.json()["documents"] for r in d["relations"])
    assert relations  # the opinionated ensemble finds some
    info = poll(lambda: (found := model_info(shadow))["rollout"]["shadow"]["calls"]["compared"] >= len(documents)
                and found or None, timeout=60)
    assert info, model_info(shadow)
    shadowed = info["rollout"]["shadow"]
    assert shadowed["calls"] == {"compared": len(documents), "failed": 0, "timed_out": 0, "skipped": 0}
    assert {t: (c["agreed"], c["champion_only"], c["challenger_only"]) for t, c in shadowed["by_type"].items()} == {
        t: (n, 0, 0) for t, n in relations.items()}


@pytest.mark.slow
def test_http_a_challenger_that_fails_to_load_leaves_the_champion_serving(served):
    url = served["broken"]
    info = challenger_settled(url, "failed")
    assert "sha256 mismatch" in info["rollout"]["challenger_error"], info["rollout"]
    answers = [post(url, [one_doc()]) for _ in range(20)]  # half would go to a ready challenger
    assert {(a.status_code, a.headers["X-Model-Role"]) for a in answers} == {(200, "champion")}


@contextlib.contextmanager
def forwarding(upstream: str, headers: dict[str, str]) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """A server on a free loopback port that forwards each request to ``upstream`` with ``headers`` added (the page
    sends no ``X-Request-Key``) and passes the answer back with its content, security and model headers; yields its
    URL and the (role, version) of each relations answer it passed on."""
    passed_on = (CONTENT_TYPE, "Content-Security-Policy", ROLE_HEADER, VERSION_HEADER)
    answered = []

    class Forward(BaseHTTPRequestHandler):
        def do_GET(self):
            self._forward(None)

        def do_POST(self):
            self._forward(self.rfile.read(int(self.headers["Content-Length"])))

        def _forward(self, body: bytes | None) -> None:
            sent = {**headers, CONTENT_TYPE: self.headers.get(CONTENT_TYPE, "text/plain")}
            answer = requests.request(self.command, f"{upstream}{self.path}", data=body, headers=sent, timeout=120)
            if self.path.endswith("/v1/relations"):
                answered.append((answer.headers.get(ROLE_HEADER), answer.headers.get(VERSION_HEADER)))
            self.send_response(answer.status_code)
            for name in passed_on:
                if name in answer.headers:
                    self.send_header(name, answer.headers[name])
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        def log_message(self, *args):
            pass

    with http_server(Forward) as url:
        yield url, answered


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_the_page_says_which_model_version_answered(served, tmp_path):
    """The page at ``/`` in headless Chromium, its requests carrying a key that the canary sends to the challenger:
    its status line names the challenger and its registry version (1), which differs from the champion's (2)."""
    url = served["canary"]
    challenger_settled(url, "ready")
    key = next(f"k{i}" for i in range(100) if bucket(f"k{i}") < PERCENT)
    with forwarding(url, {KEY_HEADER: key}) as (page, answered):
        dom = headless_dom(f"{page}/#send", tmp_path)
    assert 'data-state="done"' in dom, dom[-2000:]
    assert answered == [("challenger", "1")]
    status = html.unescape(re.search(r'<span id="status"[^>]*>([^<]*)</span>', dom).group(1))
    assert status.endswith(" ms, answered by the challenger, model version 1"), status


@pytest.mark.slow
def test_http_rollout_metrics_are_exported_per_version(served):
    """After the tests above: Ray's metrics port shows requests per version, shadow agreement and the failed
    challenger (exported every few seconds, hence the wait)."""
    wanted = [r'ray_drugprot_version_requests_total\{[^}]*role="challenger"[^}]*\} \d',
              r'ray_drugprot_version_request_seconds_count\{[^}]*version="2"[^}]*\} \d',
              r'ray_drugprot_shadow_relations_total\{[^}]*outcome="agreed"[^}]*\} \d',
              r'ray_drugprot_shadow_calls_total\{[^}]*outcome="compared"[^}]*\} \d',
              r'ray_drugprot_challenger_state\{(?=[^}]*application="broken")(?=[^}]*state="failed")[^}]*\} 1\.0']

    def exported():
        text = requests.get(served["metrics"], timeout=10).text
        return all(re.search(pattern, text) for pattern in wanted) or None

    assert poll(exported, timeout=90, interval=2.0), [
        p for p in wanted if not re.search(p, requests.get(served["metrics"], timeout=10).text)]


def test_the_serve_config_in_the_docs_deploys_the_challenger_beside_the_champion():
    """docs/serving.md's two-application config is a valid Serve config whose builders accept its args."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from drugprot.serving import build_app, build_challenger
    from drugprot.serving.app import challenger_app_name

    text = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    block = re.search(r"```yaml\n(applications:\n.*?build_challenger.*?)```", text, re.DOTALL).group(1)
    champion, challenger = ServeDeploySchema.model_validate(yaml.safe_load(block)).applications
    assert (challenger.name, challenger.route_prefix) == (challenger_app_name(champion.name), None)
    assert champion.args == challenger.args and parse_options(champion.args).rollout.canary_percent == 10
    build_app(champion.args), build_challenger(challenger.args)


def test_a_bad_challenger_alias_is_refused_before_ray_starts(smoke_model_dir, tmp_path, capsys):
    """The challenger's registry URI is resolved like --model's, before anything starts: a typo costs no Ray start."""
    import mlflow

    from drugprot.cli import main

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=store).search_registered_models()  # an empty registry
    assert main(["serve", "--model", str(smoke_model_dir), "--challenger", "models:/no-such-model@challenger",
                 "--canary-percent", "5", "--tracking-uri", store, "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "models:/no-such-model@challenger: no registered model 'no-such-model'" in err, err
    assert not (tmp_path / "run").exists()
