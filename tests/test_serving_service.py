"""serving.service in this process: requests scored like ``predict`` (split or batched together), warm-up and
readiness, failures, and models loaded from a folder or the registry."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from drugprot.candidates import document_candidates
from drugprot.errors import DrugprotError
from drugprot.inference import Predictor
from drugprot.model.artifacts import load_artifact
from drugprot.serving.api import create_api
from drugprot.serving.options import parse_options
from drugprot.serving.service import ModelService, RelationService, warmup_document
from fixtures_serving import (answered, assert_equal_up_to_rounding, document_json, ensemble,  # noqa: F401 - fixture
                              expected, one_doc, service_for)


def test_a_split_request_scores_like_predict_in_bounded_model_calls(ensemble, dev_documents):
    """The development sample as one request, cut into chunks of 16 pairs: every relation and vote as ``predict``
    gives them, scores equal up to float rounding (other call shapes), and no model call over 16 pairs."""
    service = service_for(ensemble, max_batch_pairs=16)
    from drugprot.serving.schemas import RelationsRequest

    request = RelationsRequest.model_validate({"documents": [document_json(d) for d in dev_documents]})
    answer, _ = asyncio.run(service.relations(request))
    assert_equal_up_to_rounding(answered(answer.model_dump()), expected(ensemble, dev_documents))
    stats = service.model.batcher.stats
    pairs = sum(len(ensemble.candidates([d])) for d in dev_documents)
    assert stats.split_items == 1 and stats.chunks == -(-pairs // 16) and stats.largest_pairs <= 16


def test_warmup_document_has_offsets_that_match_its_text():
    document = warmup_document("w")
    assert len(document.entities) == 12
    assert all(document.text[e.start:e.end] == e.text for e in document.entities.values())
    assert len(document_candidates(document)) == 32


def test_concurrent_requests_share_batches_and_match_predict(ensemble, dev_documents):
    service = service_for(ensemble, max_batch_pairs=64, batch_wait_ms=20)
    from drugprot.serving.schemas import RelationsRequest

    async def scenario():
        requests = [RelationsRequest.model_validate({"documents": [document_json(d)]}) for d in dev_documents]
        return [answer for answer, _ in await asyncio.gather(*(service.relations(r) for r in requests))]

    responses = asyncio.run(scenario())
    want = expected(ensemble, dev_documents)
    for doc, response in zip(dev_documents, responses):
        (got,) = response.documents
        assert [(r.chemical, r.gene, r.type) for r in got.relations] == [w[:3] for w in want[doc.pmid]]
        assert all(abs(r.score - w[3]) <= 2e-6 for r, w in zip(got.relations, want[doc.pmid]))
    stats = service.model.batcher.stats
    assert stats.items == len(dev_documents) and stats.batches < len(dev_documents)  # requests shared batches
    assert stats.largest_pairs <= 64 or stats.batches == stats.items


def test_ready_only_after_warm_up(ensemble):
    options = parse_options({"model": "x", "warmup_rounds": 1})
    model = ModelService(ensemble, options)
    service = RelationService(model, options)
    with TestClient(create_api(service)) as before:
        assert before.get("/healthz").json() == {"status": "ok"}
        readiness = before.get("/readyz")
        assert readiness.status_code == 503 and readiness.json() == {"status": "warming up"}
        refused = before.post("/v1/relations", json={"documents": [one_doc()]})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "still warming up" in refused.json()["detail"]
        model.start_warmup().result(timeout=60)
        assert before.get("/readyz").status_code == 200
        assert before.post("/v1/relations", json={"documents": [one_doc()]}).status_code == 200


class Broken:
    """A predictor whose scorer fails: warm-up fails, or a request does."""

    def __init__(self, real, *, fail_warmup: bool):
        self.real, self.fail_warmup, self.calls = real, fail_warmup, 0
        self.members, self.vote_mode, self.interval, self.metadata = real.members, real.vote_mode, real.interval, {}
        self.plan, self.scorer = real.plan, self

    def probabilities(self, job, **options):
        self.calls += 1
        if self.fail_warmup or any(d.title.startswith("BOOM") for d in job.documents):
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.real.scorer.probabilities(job, **options)


def test_failed_warm_up_is_reported_and_fails_health(ensemble):
    options = parse_options({"model": "x", "warmup_rounds": 1})
    model = ModelService(Broken(ensemble, fail_warmup=True), options)
    model.start_warmup().exception(timeout=60)
    with TestClient(create_api(RelationService(model, options))) as test_client:
        assert test_client.get("/readyz").json() == {
            "status": "failed", "detail": "warm-up failed: RuntimeError: CUDA out of memory (simulated)"}
        assert test_client.get("/healthz").status_code == 500
    with pytest.raises(RuntimeError, match="warm-up failed"):
        model.check_health()


def test_a_failing_request_gets_500_and_the_service_goes_on(ensemble):
    service = service_for(Broken(ensemble, fail_warmup=False))
    with TestClient(create_api(service), raise_server_exceptions=False) as test_client:
        no_pairs = test_client.post("/v1/relations", json={"documents": [one_doc(text="BOOM inhibits COX-1 strongly.",
                                                                                 entities=[])]})
        assert no_pairs.status_code == 200  # no entities: no pairs, the model is never called
        boom = one_doc(text="BOOM aspirin inhibits COX-1.", entities=[
            {"id": "T1", "type": "CHEMICAL", "start": 5, "end": 12}, {"id": "T2", "type": "GENE", "start": 22, "end": 27}])
        failed = test_client.post("/v1/relations", json={"documents": [boom]})
        assert failed.status_code == 500
        assert failed.json()["detail"] == "internal error (RuntimeError); the request was not processed"
        assert test_client.post("/v1/relations", json={"documents": [one_doc()]}).status_code == 200


def test_a_registry_uri_is_pinned_to_a_version_and_reported(relation_members, tmp_path, monkeypatch):
    from drugprot.ensemble import build_ensemble
    from drugprot.ensemble.publish import log_ensemble

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DRUGPROT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store must come from tracking_uri alone
    built = build_ensemble(relation_members, tmp_path / "ensemble", vote="soft", log=lambda _: None)
    log_ensemble(built.path, tracking_uri=store, register="drugprot-serving-test", log=lambda _: None)
    service = ModelService.load(parse_options({"model": "models:/drugprot-serving-test@champion",
                                                  "tracking_uri": store, "warmup_rounds": 0}))
    info = service.model_info()
    assert (info.uri, info.name, info.version, info.alias) == (
        "models:/drugprot-serving-test@champion", "drugprot-serving-test", "1", "champion")
    assert info.dev_f1 == pytest.approx(built.meta["dev"]["ensemble"]["f1"], abs=1e-6)
    assert [m.name for m in info.members] == ["m1-seed1", "m2-seed2", "m3-seed3"] and info.vote == "soft"
    assert info.swap_error is None
    # a second version takes the alias; a replica pinned to version 1 (the alias watcher's) still loads version 1
    log_ensemble(built.path, tracking_uri=store, register="drugprot-serving-test", force=True, log=lambda _: None)
    options = parse_options({"model": "models:/drugprot-serving-test@champion", "tracking_uri": store,
                             "warmup_rounds": 0})
    assert ModelService.load(options).model_info().version == "2"
    pinned = ModelService.load(options, version="1", swap_error="version 2: broken").model_info()
    assert (pinned.version, pinned.alias, pinned.swap_error) == ("1", "champion", "version 2: broken")
    with pytest.raises(DrugprotError, match="model 'drugprot-serving-test' has no version 7"):
        ModelService.load(options, version="7")


def test_a_cpu_replica_can_serve_the_cascade_path_of_drugprot_predict(relation_members, dev_documents):
    """--precision cascade on drugprot serve: the replica's predictor runs the cascade as predict's does, and
    /v1/model says so; the default stays fp32 on CPU."""
    from drugprot.cli import build_parser
    from drugprot.cli.serve import serve_options

    args = build_parser().parse_args(["serve", "--model", str(relation_members[0]), "--precision", "cascade"])
    cascade = ModelService.load(parse_options({**serve_options(args), "warmup_rounds": 0}))
    plain = ModelService.load(parse_options({"model": str(relation_members[0]), "warmup_rounds": 0}))
    assert (cascade.model_info().precision, plain.model_info().precision) == ("cascade", "fp32")
    assert cascade.predictor.precision == "cascade"
    documents = dev_documents[:3]
    reference = Predictor([load_artifact(relation_members[0])], device="cpu", precision="cascade")
    assert cascade.predictor.member_probabilities(documents, cascade.predictor.candidates(documents)).equal(
        reference.member_probabilities(documents, reference.candidates(documents)))
