"""Serving without a cluster: options, YAML configs, the pair batcher, the service and its FastAPI app, the Serve
deployment class called directly, and a bounded fuzz of request bodies. Real Serve over HTTP is in test_serving.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drugprot.candidates import document_candidates
from drugprot.config import SAMPLE_DIR
from drugprot.corpus import read_split
from drugprot.errors import DrugprotError
from drugprot.inference import InferenceOptions, Predictor
from drugprot.model.artifacts import load_artifact, save_artifact
from drugprot.serving.api import create_api, resolve_token
from drugprot.serving.batching import Job, PairBatcher, QueueWaitExceeded, plan_batch, run_jobs
from drugprot.serving.options import ServeOptions, parse_options
from drugprot.serving.service import ModelService, RelationService, warmup_document

REPO = Path(__file__).resolve().parents[1]


# ---- tiny models that actually predict relations ------------------------------------------------------------
def opinionated_member(source: Path, out: Path) -> Path:
    """A copy of a smoke member whose head is sharpened ×10 and re-centred on the development sample, so it predicts
    every label with clear margins (the 1-epoch smoke models predict NONE everywhere). A real, verified artifact."""
    member = load_artifact(source)
    documents = read_split(SAMPLE_DIR, "development").documents
    head = member.model.classifier
    with torch.no_grad():
        head.weight.mul_(10.0)
        head.bias.mul_(10.0)
        predictor = Predictor([member], vote="soft", device="cpu")
        log_p = predictor.member_probabilities(documents, predictor.candidates(documents))[0].clamp_min(1e-30).log()
        head.bias.sub_(log_p.mean(0))
    info = {k: v for k, v in member.info.items() if k != "format_version"}
    return save_artifact(out, model=member.model, tokenizer=member.tokenizer, info=info)


@pytest.fixture(scope="session")
def relation_members(smoke_members, tmp_path_factory) -> list[Path]:  # noqa: F811
    root = tmp_path_factory.mktemp("opinionated")
    return [opinionated_member(path, root / f"member-{i}") for i, path in enumerate(smoke_members)]


def document_json(doc, *, form: str = "title") -> dict:
    entities = [{"id": e.id, "type": e.type, "start": e.start, "end": e.end, "text": e.text} for e in doc.entities.values()]
    if form == "text":
        return {"id": doc.pmid, "text": doc.text, "entities": entities}
    return {"id": doc.pmid, "title": doc.title, "abstract": doc.abstract, "entities": entities}


def expected(predictor, documents, **kwargs) -> dict[str, list[tuple]]:
    """``Predictor.predict`` as the HTTP answer would show it: per document id, (chemical, gene, type, score, votes)."""
    predictions = predictor.predict(documents, **kwargs)
    return {d.pmid: [(r.chemical, r.gene, r.type, r.score, list(r.votes)) for r in rel] for d, rel in zip(documents, predictions)}


def answered(body: dict) -> dict[str, list[tuple]]:
    return {d["id"]: [(r["chemical"], r["gene"], r["type"], r["score"], r["votes"]) for r in d["relations"]]
            for d in body["documents"]}


def assert_equal_up_to_rounding(got: dict[str, list[tuple]], want: dict[str, list[tuple]]) -> None:
    """Same relations, labels and votes; scores within float rounding (a request scored in other call shapes)."""
    assert {k: [(*r[:3], r[4]) for r in v] for k, v in got.items()} == {k: [(*r[:3], r[4]) for r in v] for k, v in want.items()}
    assert all(abs(g[3] - w[3]) <= 2e-6 for k in want for g, w in zip(got[k], want[k]))


def service_for(predictor, **options) -> RelationService:
    """Ingress and model halves in this process: the model warmed up, the ingress calling it directly."""
    parsed = parse_options({"model": "(in-process)", "warmup_rounds": 1, **options})
    model = ModelService(predictor, parsed)
    model.start_warmup().result(timeout=120)
    return RelationService(model, parsed)


@pytest.fixture(scope="module")
def ensemble(relation_members) -> Predictor:
    """Three opinionated members, soft voting: scores are real probabilities, votes differ between members."""
    return Predictor([load_artifact(p) for p in relation_members], vote="soft", device="cpu")


@pytest.fixture(scope="module")
def client(ensemble):
    service = service_for(ensemble, max_batch_pairs=300,  # no request is split: each runs as predict runs it, exactly
                          limits={"max_documents": 20, "max_characters": 40_000, "max_entities": 400,
                                  "max_pairs": 300, "max_body_bytes": 200_000})
    with TestClient(create_api(service)) as test_client:
        test_client.service = service
        yield test_client


# ---- options and configs --------------------------------------------------------------------------------------
def test_options_map_onto_deployment_options():
    fixed = parse_options({"model": "m", "replicas": 3, "gpus_per_replica": 0.5, "max_batch_pairs": 32}).deployment_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert fixed["max_ongoing_requests"] == 32  # >= the batch size, so one-pair requests can still fill a batch
    assert fixed["max_queued_requests"] == 64
    auto = parse_options({"model": "m", "autoscale": "1:4"}).deployment_options()
    assert auto["num_replicas"] == "auto"
    assert auto["autoscaling_config"]["min_replicas"] == 1 and auto["autoscaling_config"]["max_replicas"] == 4
    assert auto["autoscaling_config"]["target_ongoing_requests"] == 8  # 64 pairs / 8
    unbatched = parse_options({"model": "m", "max_batch_pairs": 1})
    assert unbatched.deployment_options()["max_ongoing_requests"] == 1
    assert parse_options({"model": "m", "gpus_per_replica": 1}).device == "cuda"
    assert parse_options({"model": "m", "num_cpus": 0.5}).torch_threads == 1
    assert parse_options({"model": "m", "num_cpus": 3.5}).torch_threads == 3
    assert parse_options({"model": "m"}).inference == InferenceOptions()
    assert parse_options({"model": "m", "precision": "cascade", "cascade_margin": 0}).inference == InferenceOptions(
        precision="cascade", cascade_margin=0.0)
    assert parse_options({"model": "m", "early_exit": "calibrated"}).inference == InferenceOptions(early_exit="calibrated")
    assert parse_options({"model": "m", "early_exit": "0.7", "vote": "soft"}).inference == InferenceOptions(
        early_exit=0.7, vote="soft")


@pytest.mark.parametrize("args, message", [
    ({}, r"serve args: model: Field required"),
    ({"model": "m", "replica": 2}, r"serve args: replica: Extra inputs are not permitted, got 2"),
    ({"model": "m", "replicas": 2, "autoscale": "1:3"}, r"serve args: give either replicas or autoscale, not both"),
    ({"model": "m", "autoscale": "4"}, r"autoscale must look like MIN:MAX \(e.g. 1:4\), got '4'"),
    ({"model": "m", "autoscale": "3:1"}, r"needs 0 <= MIN <= MAX and MAX >= 1, got '3:1'"),
    ({"model": "m", "max_batch_pairs": 0}, r"serve args: max_batch_pairs: Input should be greater than or equal to 1, got 0"),
    ({"model": "m", "limits": {"max_pairs": -1}}, r"serve args: limits.max_pairs: Input should be greater than or equal to 1"),
    ({"model": "m", "max_queued_requests": 0}, r"max_queued_requests: must be -1 \(unbounded\) or at least 1, got 0"),
    ({"model": "runs/ensemble", "follow_alias": True},
     r"serve args: follow_alias needs a registry alias to watch: model must be models:/NAME@ALIAS .*got 'runs/ensemble'"),
    ({"model": "models:/dp/3", "follow_alias": True}, r"follow_alias needs a registry alias .*got 'models:/dp/3'"),
    ({"model": "models:/dp@champion", "follow_alias": True, "poll_s": 0},
     r"serve args: poll_s: Input should be greater than 0, got 0"),
    ({"model": "m", "max_queue_wait_s": -1}, r"serve args: max_queue_wait_s: Input should be greater than 0, got -1"),
    ({"model": "m", "precision": "auto"},
     r"serve args: precision: must be one of bf16, fp32, int8, cascade, got 'auto'"),
    ({"model": "m", "precision": "int8", "gpus_per_replica": 1},
     r"serve args: precision: int8 runs on CPU replicas only; set gpus_per_replica to 0 or precision to bf16"),
    ({"model": "m", "precision": "cascade", "gpus_per_replica": 1},
     r"serve args: precision: cascade runs on CPU replicas only; set gpus_per_replica to 0 or precision to bf16"),
    ({"model": "m", "cascade_margin": 0.1}, r"serve args: cascade_margin: applies to precision cascade only, got precision bf16"),
    ({"model": "m", "precision": "cascade", "cascade_margin": 1.5},
     r"serve args: cascade_margin: must be between 0 and 1 \(a probability margin\), got 1.5"),
    ({"model": "m", "execution": "fold", "early_exit": 0.7},
     r"serve args: execution: 'fold' cannot exit early; members leave pairs early only in turn"),
    ({"model": "m", "early_exit": 1.5}, r"serve args: early_exit: must be a probability in \(0, 1\] or 'calibrated', got 1.5"),
    ({"model": "m", "early_exit": "often"}, r"early_exit: must be a probability in \(0, 1\] or 'calibrated', got 'often'"),
    ({"model": "m", "early_exit": True}, r"early_exit: must be a probability in \(0, 1\] or 'calibrated', got True"),
])
def test_options_errors_name_key_and_value(args, message):
    with pytest.raises(DrugprotError, match=message):
        parse_options(args)


@pytest.mark.parametrize("name", ["local.yaml", "cluster.yaml"])
def test_serve_configs_import_the_builder_with_valid_args(name):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from drugprot.serving import build_app

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve" / name).read_text()))
    (application,) = config.applications
    assert application.import_path == "drugprot.serving:build_app"
    options = parse_options(application.args)
    assert isinstance(build_app(application.args), Application)
    deployments = {d.name: d for d in application.deployments}
    assert set(deployments) == {"DrugprotIngress", "DrugprotModel"}  # names the builder gives its deployments
    model = deployments["DrugprotModel"]
    assert model.max_ongoing_requests >= options.max_batch_pairs  # one-pair requests can still fill a batch
    if name == "local.yaml":
        assert config.http_options.host == "127.0.0.1"
        assert model.num_replicas == 1 and deployments["DrugprotIngress"].num_replicas == 1
    else:
        assert model.autoscaling_config["max_replicas"] == 4 and options.gpus_per_replica == 1 and options.require_token


def test_cli_serve_is_registered_and_maps_flags():
    from drugprot.cli import build_parser
    from drugprot.cli.serve import serve_options

    args = build_parser().parse_args(["serve", "--model", "m", "--autoscale", "1:3", "--gpus-per-replica", "0.5",
                                      "--max-batch-pairs", "16", "--batch-wait-ms", "2"])
    options = parse_options(serve_options(args))
    assert (options.autoscale, options.gpus_per_replica, options.max_batch_pairs, options.batch_wait_ms) == ("1:3", 0.5, 16, 2.0)
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", "--replicas", "2", "--autoscale", "1:3"])


@pytest.mark.parametrize("flags, message", [
    (["--model", "runs/ensemble", "--follow-alias"], "option: follow_alias needs a registry alias to watch: model must "
                                                     "be models:/NAME@ALIAS (e.g. models:/drugprot@champion), got "
                                                     "'runs/ensemble'"),
    (["--model", "models:/dp@champion", "--follow-alias", "--poll-s", "-1"],
     "option: poll_s: Input should be greater than 0, got -1.0"),
])
def test_cli_serve_follow_alias_flags_are_checked_as_usage(flags, message, capsys):
    from drugprot.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", *flags])
    assert exit_.value.code == 2
    assert f"drugprot serve: error: {message}" in capsys.readouterr().err
    options = parse_options({"model": "models:/dp@champion", "follow_alias": True})
    assert options.poll_s == 30 and options.deployment_options()["max_surge_percent"] == 100


def test_cli_serve_refuses_a_missing_model_folder_before_starting_ray(tmp_path, capsys):
    from drugprot.cli import main

    assert main(["serve", "--model", str(tmp_path / "nowhere")]) == 1
    assert f"--model {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err


def test_cli_serve_refuses_an_early_exit_for_a_single_model_before_starting_ray(smoke_model_dir, capsys):
    from drugprot.cli import main

    assert main(["serve", "--model", str(smoke_model_dir), "--early-exit", "0.7"]) == 1
    assert "is a single model; members leave pairs early only in an ensemble" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", str(smoke_model_dir), "--early-exit", "1.5"])
    assert exit_.value.code == 2
    assert "option: early_exit: must be a probability in (0, 1] or 'calibrated', got '1.5'" in capsys.readouterr().err


# ---- the batcher without a framework --------------------------------------------------------------------------
@pytest.mark.parametrize("sizes, budget, taken", [
    ([], 8, 0), ([3], 8, 1), ([3, 5], 8, 2), ([3, 5, 1], 8, 2), ([20, 1], 8, 1), ([1] * 10, 4, 4), ([4, 4, 4], 8, 2),
])
def test_plan_batch_takes_the_fifo_prefix_that_fits(sizes, budget, taken):
    assert plan_batch(sizes, budget) == taken


class Item:
    def __init__(self, name: str, pairs: int):
        self.name, self.pairs = name, pairs


class Gate:
    """A batch function that records its batches and can hold the first one until released."""

    def __init__(self, hold_first: bool = False, fail_on: str | None = None):
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail_on = fail_on

    def __call__(self, items):
        self.started.set()
        self.release.wait(10)
        names = [i.name for i in items]
        self.batches.append(names)
        if self.fail_on in names:
            raise ValueError(f"cannot score {self.fail_on}")
        return [f"result:{name}" for name in names]


async def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


def test_batcher_fills_batches_from_concurrent_callers_while_one_runs():
    async def scenario():
        gate = Gate(hold_first=True)
        batcher = PairBatcher(gate, max_pairs=8, wait_s=0.0)
        first = asyncio.create_task(batcher.submit(Item("a", 3)))
        await until(gate.started.is_set)
        rest = [asyncio.create_task(batcher.submit(Item(name, pairs))) for name, pairs in
                [("b", 3), ("c", 5), ("d", 20), ("e", 1)]]
        await until(lambda: batcher.queued == 4)
        gate.release.set()
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return gate.batches, results, batcher.stats

    batches, results, stats = asyncio.run(scenario())
    assert batches == [["a"], ["b", "c"], ["d"], ["e"]]  # budget 8, FIFO, an oversized item runs alone
    assert results == ["result:a", "result:b", "result:c", "result:d", "result:e"]
    assert (stats.batches, stats.items, stats.pairs, stats.largest_pairs) == (4, 5, 32, 20)


def test_batcher_waits_at_most_wait_s_for_company():
    async def scenario():
        gate = Gate()
        batcher = PairBatcher(gate, max_pairs=100, wait_s=0.05)
        started = time.monotonic()
        one = await batcher.submit(Item("alone", 1))
        elapsed = time.monotonic() - started
        together = await asyncio.gather(*(batcher.submit(Item(f"x{i}", 1)) for i in range(5)))
        await batcher.close()
        return one, elapsed, together, gate.batches

    one, elapsed, together, batches = asyncio.run(scenario())
    assert one == "result:alone" and 0.04 <= elapsed < 2.0
    assert batches[1] == [f"x{i}" for i in range(5)] and len(together) == 5


def test_batcher_waits_only_while_requests_are_on_their_way():
    async def scenario(on_the_way: int):
        gate = Gate()
        batcher = PairBatcher(gate, max_pairs=100, wait_s=0.5, announced=lambda: on_the_way)
        started = time.monotonic()
        await batcher.submit(Item("lone", 1))
        await batcher.close()
        return time.monotonic() - started

    assert asyncio.run(scenario(0)) < 0.25  # nobody coming: no wait
    assert asyncio.run(scenario(1)) >= 0.45  # someone coming (who never arrives): waits wait_s, no longer


def test_arrivals_are_counted_until_queued_or_answered(client):
    service = client.service
    assert service._preparing == 0
    assert client.post("/v1/relations", json={"documents": [one_doc()]}).status_code == 200
    assert client.post("/v1/relations", content=b"{", headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/v1/relations", json={"documents": many_docs(21)}).status_code == 413
    assert service._preparing == 0


def test_batcher_reports_a_failed_batch_to_its_callers_and_goes_on():
    async def scenario():
        gate = Gate(hold_first=True, fail_on="bad")
        batcher = PairBatcher(gate, max_pairs=10, wait_s=0.0)
        first = asyncio.create_task(batcher.submit(Item("first", 1)))
        await until(gate.started.is_set)
        pair = [asyncio.create_task(batcher.submit(Item(n, 1))) for n in ("ok", "bad")]
        await until(lambda: batcher.queued == 2)
        gate.release.set()
        outcomes = await asyncio.gather(first, *pair, return_exceptions=True)
        after = await batcher.submit(Item("later", 1))
        await batcher.close()
        return outcomes, after, batcher.stats.failed_batches

    outcomes, after, failed = asyncio.run(scenario())
    assert outcomes[0] == "result:first"
    assert all(isinstance(o, ValueError) and "cannot score bad" in str(o) for o in outcomes[1:])
    assert after == "result:later" and failed == 1


def test_batcher_drops_callers_that_gave_up_and_checks_result_length():
    async def scenario():
        gate = Gate(hold_first=True)
        batcher = PairBatcher(gate, max_pairs=10, wait_s=0.0)
        first = asyncio.create_task(batcher.submit(Item("first", 1)))
        await until(gate.started.is_set)
        gone = asyncio.create_task(batcher.submit(Item("gone", 1)))
        kept = asyncio.create_task(batcher.submit(Item("kept", 1)))
        await until(lambda: batcher.queued == 2)
        gone.cancel()
        gate.release.set()
        await asyncio.gather(first, kept)
        short = PairBatcher(lambda items: [], max_pairs=10, wait_s=0.0)
        with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
            await short.submit(Item("x", 1))
        await short.close()
        await batcher.close()
        with pytest.raises(RuntimeError, match="shut down"):
            await batcher.submit(Item("late", 1))
        return gate.batches, batcher.stats.cancelled

    batches, cancelled = asyncio.run(scenario())
    assert batches == [["first"], ["kept"]] and cancelled == 1


def test_batcher_refuses_what_would_wait_past_the_latency_objective():
    """max_wait_s: refused at submit when the pairs ahead (queued and running) at the measured pairs/s would take
    longer; refused instead of run when an admitted item has waited longer all the same."""
    async def scenario():
        now = [0.0]
        gate = Gate(hold_first=True)
        batcher = PairBatcher(gate, max_pairs=10, wait_s=0.0, clock=lambda: now[0], max_wait_s=1.5)
        first = asyncio.create_task(batcher.submit(Item("a", 10)))
        await until(gate.started.is_set)
        assert batcher.expected_wait_s() == 0.0  # no call timed yet: no estimate, everything admitted
        gate.started.clear()
        now[0] = 1.0  # the first call takes one second: 10 pairs/s
        gate.release.set()
        await first
        rate = batcher.pairs_per_s
        gate.release.clear()
        second = asyncio.create_task(batcher.submit(Item("b", 10)))
        await until(gate.started.is_set)  # b runs (10 pairs ahead of anything new)
        third = asyncio.create_task(batcher.submit(Item("c", 10)))  # expects 1 s: admitted
        await until(lambda: batcher.queued == 1)
        with pytest.raises(QueueWaitExceeded, match=r"would wait about 2\.0 s in its queue, beyond the 1\.5 s objective"):
            await batcher.submit(Item("d", 1))  # (10 queued + 10 running) / 10 pairs/s = 2 s
        now[0] = 3.0  # b ends two seconds later: c has waited 2 s
        gate.release.set()
        answer = await second
        with pytest.raises(QueueWaitExceeded, match=r"this request waited 2\.0 s in its queue"):
            await third
        described = batcher.describe()
        await batcher.close()
        return rate, answer, gate.batches, batcher.stats, described

    rate, answer, batches, stats, described = asyncio.run(scenario())
    assert rate == 10.0 and answer == "result:b" and batches == [["a"], ["b"]]  # c never ran
    assert (stats.refused, stats.cancelled) == (2, 0)
    assert described["refused_by_wait_objective"] == 2 and described["max_wait_s"] == 1.5


def test_a_request_refused_by_the_latency_objective_is_a_json_503_with_retry_after(ensemble):
    service = service_for(ensemble, max_queue_wait_s=0.5)
    model = service.model
    busy = threading.Event()
    model._executor.submit(busy.wait, 30)  # the model thread is busy: the next batch waits behind it
    model.batcher.pairs_per_s = 0.5  # as if the recent model calls had been this slow
    with TestClient(create_api(service)) as http:
        admitted: dict = {}
        waiting = threading.Thread(target=lambda: admitted.update(
            response=http.post("/v1/relations", json={"documents": [one_doc()]})))
        waiting.start()
        deadline = time.monotonic() + 30
        while model.batcher.expected_wait_s() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = http.post("/v1/relations", json={"documents": [one_doc()]})
        busy.set()
        waiting.join(60)
    found = re.search(r"would wait about (\d+\.\d) s in its queue, beyond the 0\.5 s objective \(--max-queue-wait-s\)",
                      refused.json()["detail"])
    assert refused.status_code == 503 and found, refused.json()
    expected = float(found.group(1))  # rounded to 0.1 s; Retry-After is the wait rounded up to whole seconds
    assert max(1, math.ceil(expected - 0.05)) <= int(refused.headers["retry-after"]) <= max(1, math.ceil(expected + 0.05))
    assert admitted["response"].status_code == 200  # admitted before the queue built up: answered, however late


def split_item(item: Item, max_pairs: int) -> list[Item]:
    return [Item(f"{item.name}#{i}", min(max_pairs, item.pairs - start))
            for i, start in enumerate(range(0, item.pairs, max_pairs))]


def join_names(results) -> str:
    return "+".join(results)


def split_batcher(gate: Gate, **options) -> PairBatcher:
    return PairBatcher(gate, max_pairs=10, wait_s=0.0, split=split_item, join=join_names, **options)


def test_big_items_are_cut_into_bounded_chunks_that_take_turns_with_small_ones():
    """Round-robin: after each chunk a big item queues again behind what came meanwhile, so the small item that
    arrived last waits for one chunk of each big one, not for both whole; results are joined in chunk order."""
    async def scenario():
        gate = Gate(hold_first=True)
        batcher = split_batcher(gate)
        first = asyncio.create_task(batcher.submit(Item("w", 1)))
        await until(gate.started.is_set)
        big = asyncio.create_task(batcher.submit(Item("B", 25)))
        other = asyncio.create_task(batcher.submit(Item("C", 20)))
        small = asyncio.create_task(batcher.submit(Item("s", 3)))
        await until(lambda: batcher.queued == 3)
        batcher.pairs_per_s = 10.0  # as if measured: the estimate follows the turns, not the whole queue
        waits = batcher.expected_wait_s(1), batcher.expected_wait_s(3)
        finished = []
        for task in (big, other, small):
            task.add_done_callback(lambda t: finished.append(t.result()))
        gate.release.set()
        results = await asyncio.gather(first, big, other, small)
        await batcher.close()
        return gate.batches, results, finished, waits, batcher.stats

    batches, results, finished, waits, stats = asyncio.run(scenario())
    assert batches == [["w"], ["B#0"], ["C#0"], ["s"], ["B#1"], ["C#1"], ["B#2"]]
    assert results == ["result:w", "result:B#0+result:B#1+result:B#2", "result:C#0+result:C#1", "result:s"]
    assert finished[0] == "result:s"  # submitted after both big items, answered before either
    assert waits == (pytest.approx(2.4), pytest.approx(4.9))  # 1 running + (10 + 10 + 3) or (25 + 20 + 3) pairs, 10/s
    assert (stats.items, stats.chunks, stats.split_items, stats.batches, stats.largest_pairs) == (4, 7, 2, 7, 10)


def test_a_failed_or_abandoned_chunk_ends_its_item_and_drops_its_other_chunks():
    async def scenario():
        gate = Gate(hold_first=True, fail_on="B#1")
        batcher = split_batcher(gate)
        abandoned = asyncio.create_task(batcher.submit(Item("C", 30)))
        await until(gate.started.is_set)
        failing = asyncio.create_task(batcher.submit(Item("B", 30)))
        kept = asyncio.create_task(batcher.submit(Item("k", 2)))
        await until(lambda: batcher.queued == 2)
        abandoned.cancel()  # while its first chunk runs: its other two never run
        gate.release.set()
        outcomes = await asyncio.gather(failing, kept, return_exceptions=True)
        await batcher.close()
        return gate.batches, outcomes, batcher.stats

    batches, (failed, kept), stats = asyncio.run(scenario())
    assert isinstance(failed, ValueError) and "cannot score B#1" in str(failed) and kept == "result:k"
    assert batches == [["C#0"], ["B#0"], ["k"], ["B#1"]]
    assert (stats.failed_batches, stats.cancelled, stats.items) == (1, 1, 1)


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


def test_batcher_refuses_bad_settings():
    with pytest.raises(ValueError, match="max_pairs must be at least 1, got 0"):
        PairBatcher(lambda items: items, max_pairs=0, wait_s=0)
    with pytest.raises(ValueError, match="wait_s must be >= 0, got -1"):
        PairBatcher(lambda items: items, max_pairs=1, wait_s=-1)
    with pytest.raises(ValueError, match="max_wait_s must be > 0, got 0"):
        PairBatcher(lambda items: items, max_pairs=1, wait_s=0, max_wait_s=0)
    with pytest.raises(ValueError, match="split and join go together"):
        PairBatcher(lambda items: items, max_pairs=1, wait_s=0, split=split_item)


# ---- the one inference path, batched -------------------------------------------------------------------------
def test_a_job_alone_is_exactly_predict(ensemble, dev_documents):
    candidates = ensemble.candidates(dev_documents)
    (alone,) = run_jobs(ensemble.scorer, [Job(dev_documents, candidates)])
    assert torch.equal(alone, ensemble.member_probabilities(dev_documents, candidates, skip_settled=True))


def test_jobs_batched_together_match_predict_up_to_float_rounding(ensemble, dev_documents):
    jobs = []
    for i, doc in enumerate(dev_documents):
        keyed = [type(doc)(f"job{i}", doc.title, doc.abstract, doc.entities)]
        jobs.append(Job(keyed, ensemble.candidates(keyed)))
    batched = run_jobs(ensemble.scorer, jobs)
    for doc, job, probabilities in zip(dev_documents, jobs, batched):
        alone = ensemble.member_probabilities([doc], ensemble.candidates([doc]), skip_settled=True)
        assert probabilities.shape == alone.shape
        assert torch.allclose(probabilities, alone, atol=1e-5, rtol=0)
        assert torch.equal(probabilities.mean(0).argmax(-1), alone.mean(0).argmax(-1))
    with pytest.raises(ValueError, match="document keys must be unique"):
        run_jobs(ensemble.scorer, [jobs[0], jobs[0]])


def test_warmup_document_has_offsets_that_match_its_text():
    document = warmup_document("w")
    assert len(document.entities) == 12
    assert all(document.text[e.start:e.end] == e.text for e in document.entities.values())
    assert len(document_candidates(document)) == 32


# ---- the HTTP app (FastAPI TestClient, no Serve) -------------------------------------------------------------
def test_one_request_with_the_development_sample_equals_predict(client, ensemble, dev_documents):
    response = client.post("/v1/relations", json={"documents": [document_json(d) for d in dev_documents]})
    assert response.status_code == 200
    got = answered(response.json())
    want = expected(ensemble, dev_documents)
    assert got == want  # labels, scores (mean probabilities, 6 decimals) and every member's vote, exactly
    assert sum(len(v) for v in want.values()) > 20 and len({r[2] for v in want.values() for r in v}) > 5
    assert [d["candidates"] for d in response.json()["documents"]] == [len(ensemble.candidates([d])) for d in dev_documents]


def test_text_form_interval_and_threshold(client, ensemble, dev_documents):
    docs = dev_documents[:3]
    by_title = client.post("/v1/relations", json={"documents": [document_json(d) for d in docs]}).json()
    by_text = client.post("/v1/relations", json={"documents": [document_json(d, form="text") for d in docs]}).json()
    assert answered(by_text) == answered(by_title)
    narrow = client.post("/v1/relations", json={"documents": [document_json(d) for d in docs], "interval": [0, 0],
                                                "threshold": 0.4}).json()
    assert answered(narrow) == expected(ensemble, docs, interval=(0, 0), threshold=0.4)
    assert all(r[3] >= 0.4 for rels in answered(narrow).values() for r in rels)


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


def one_doc(**overrides) -> dict:
    doc = {"id": "d1", "text": "Aspirin inhibits COX-1 strongly.",
           "entities": [{"id": "T1", "type": "CHEMICAL", "start": 0, "end": 7, "text": "Aspirin"},
                        {"id": "T2", "type": "GENE-Y", "start": 17, "end": 22, "text": "COX-1"}]}
    doc.update(overrides)
    return doc


def entity(**overrides) -> dict:
    return {"id": "T9", "type": "CHEMICAL", "start": 0, "end": 7, **overrides}


INVALID = [
    ("malformed JSON", b'{"documents": [', r"^request body: malformed JSON"),
    ("invalid UTF-8", b'{"documents": "\x80"}', r"^request body: malformed JSON \(not valid UTF-8 text at byte 15\)$"),
    ("deep nesting", b'{"documents": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
     r"^request body: malformed JSON \(nested too deeply\)$"),
    ("JSON null", b"null", r'^request body: expected a JSON object \{"documents": \[...\]\}, got JSON null$'),
    ("boolean offset", {"documents": [one_doc(entities=[entity(start=True)])]},
     r"^documents\[0\] \(id 'd1'\): entities\[0\]\.start: Input should be a valid integer"),
    ("string threshold", {"documents": [one_doc()], "threshold": "0.5"}, r"^threshold: Input should be a valid number"),
    ("string interval bound", {"documents": [one_doc()], "interval": ["-3", 3]},
     r"^interval\[0\]: Input should be a valid integer"),
    ("not an object", b"[1, 2]", r'^request body: expected a JSON object \{"documents": \[...\]\}, got JSON list'),
    ("empty body", b"", r'^request body: expected a JSON object \{"documents": \[...\]\}, got an empty body$'),
    ("no documents", {"docs": []}, r"^documents: Field required"),
    ("empty documents", {"documents": []}, r"^documents: List should have at least 1 item"),
    ("missing id", {"documents": [{"text": "x"}]}, r"^documents\[0\]: id: Field required"),
    ("missing entity field", {"documents": [one_doc(entities=[{"id": "T1", "type": "CHEMICAL", "start": 0}])]},
     r"^documents\[0\] \(id 'd1'\): entities\[0\]\.end: Field required"),
    ("unknown type", {"documents": [one_doc(entities=[entity(type="DRUG")])]},
     r"^documents\[0\] \(id 'd1'\): entities\[0\]\.type: Input should be 'CHEMICAL', 'GENE', 'GENE-Y' or 'GENE-N'"),
    ("offsets outside", {"documents": [one_doc(entities=[entity(start=20, end=99)])]},
     r"^documents\[0\] \(id 'd1'\): entities\[0\] \(id 'T9'\): offsets 20-99 lie outside the text \(length 32\)"),
    ("negative start", {"documents": [one_doc(entities=[entity(start=-1)])]},
     r"^documents\[0\] \(id 'd1'\): entities\[0\]\.start: Input should be greater than or equal to 0"),
    ("end before start", {"documents": [one_doc(entities=[entity(start=5, end=3)])]},
     r"entities\[0\] \(id 'T9'\): end 3 must be greater than start 5"),
    ("text mismatch", {"documents": [one_doc(entities=[entity(text="Aspirim")])]},
     r"^documents\[0\] \(id 'd1'\): entities\[0\] \(id 'T9'\): text 'Aspirim' does not match the text at 0-7 \('Aspirin'\)"),
    ("duplicate entity ids", {"documents": [one_doc(entities=[entity(id="T1"), entity(id="T1", start=17, end=22)])]},
     r"^documents\[0\] \(id 'd1'\): entities\[1\] \(id 'T1'\): duplicate entity id \(also entities\[0\]\)"),
    ("duplicate document ids", {"documents": [one_doc(), one_doc()]},
     r"^documents\[1\] \(id 'd1'\): duplicate document id \(also documents\[0\]\)"),
    ("text and title", {"documents": [one_doc(title="t", abstract="a")]},
     r"^documents\[0\] \(id 'd1'\): give either text, or title and abstract, not both"),
    ("no text", {"documents": [{"id": "d1", "title": "t"}]},
     r"^documents\[0\] \(id 'd1'\): give text, or title and abstract \(abstract missing\)"),
    ("unknown field", {"documents": [one_doc(pmid="1")]}, r"^documents\[0\] \(id 'd1'\): pmid: Extra inputs are not permitted"),
    ("interval out of bounds", {"documents": [one_doc()], "interval": [-80, 3]},
     r"^interval: Value error, needs -50 <= LO <= HI <= 50, got \[-80, 3\]|^interval: needs -50 <= LO <= HI <= 50"),
    ("threshold above 1", {"documents": [one_doc()], "threshold": 1.5}, r"^threshold: Input should be less than or equal to 1"),
    ("NaN threshold", b'{"documents": [{"id": "a", "text": "x"}], "threshold": NaN}', r"^threshold: Input should be a finite number"),
    ("unpaired surrogate", b'{"documents": [{"id": "a", "text": "\\ud800"}]}',
     r"^documents\[0\] \(id 'a'\): text: text is not valid Unicode \(unpaired surrogate at character 0\)"),
]


@pytest.mark.parametrize("case, body, message", INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_requests_get_422_naming_document_and_field(client, case, body, message):
    if isinstance(body, bytes):
        response = client.post("/v1/relations", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/v1/relations", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert response.json()["problems"][0] == detail
    assert re.search(message, detail), detail


def many_docs(n: int, *, chars: int = 40, genes: int = 1) -> list[dict]:
    docs = []
    for i in range(n):
        text = "Aspirin inhibits " + " ".join(["COX1"] * genes)
        text += " " + "x" * max(0, chars - len(text) - 1)
        entities = [{"id": "C", "type": "CHEMICAL", "start": 0, "end": 7}]
        entities += [{"id": f"G{g}", "type": "GENE", "start": 17 + 5 * g, "end": 21 + 5 * g} for g in range(genes)]
        docs.append({"id": f"doc{i}", "text": text, "entities": entities})
    return docs


@pytest.mark.parametrize("documents, message", [
    (many_docs(21), r"^documents: 21 documents exceed the limit of 20 per request; split the request$"),
    (many_docs(2, chars=20_001), r"^documents: 40002 characters of text exceed the limit of 40000 per request"),
    (many_docs(2, chars=2000, genes=200), r"^documents: 402 entities exceed the limit of 400 per request"),
    (many_docs(20, genes=17, chars=200), r"^documents: 340 candidate pairs exceed the limit of 300 per request \(most from "
                                          r"documents\[0\] \(id 'doc0'\): 17\); send fewer documents or a narrower interval$"),
])
def test_requests_over_a_limit_get_413(client, documents, message):
    response = client.post("/v1/relations", json={"documents": documents})
    assert response.status_code == 413, response.text
    assert re.search(message, response.json()["detail"]), response.json()["detail"]


def test_bodies_over_the_byte_limit_get_413_declared_or_streamed(client):
    big = json.dumps({"documents": many_docs(1, chars=250_000)}).encode()
    response = client.post("/v1/relations", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["detail"] == "request body: larger than the limit of 200000 bytes; split the request"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for start in range(0, len(big), 65_536):
            yield big[start:start + 65_536]

    streamed = client.post("/v1/relations", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_bearer_token_guards_everything_but_probes_and_docs(ensemble):
    service = service_for(ensemble)
    body = {"documents": [one_doc()]}
    with TestClient(create_api(service, token="s3cret")) as secured:
        missing = secured.post("/v1/relations", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.json()["detail"] == "missing or invalid bearer token: send 'Authorization: Bearer <token>'"
        assert secured.post("/v1/relations", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert secured.get("/v1/model").status_code == 401
        assert secured.post("/v1/relations", content=b"{", headers={"content-type": "application/json"}).status_code == 401
        assert secured.post("/v1/relations", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert secured.get("/healthz").status_code == 200 and secured.get("/readyz").status_code == 200
        assert secured.get("/v1/nothing-here").status_code == 401  # deny by default, not 404
    with TestClient(create_api(service, token="s3cret"), root_path="/secure") as prefixed:  # behind a route prefix
        assert prefixed.post("/secure/v1/relations", json=body).status_code == 401
        assert prefixed.get("/secure/readyz").status_code == 200
        assert prefixed.post("/secure/v1/relations", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    with TestClient(create_api(service, token=None)) as open_client:
        assert open_client.post("/v1/relations", json=body).status_code == 200


def test_rays_routes_endpoint_needs_the_token_at_the_proxy(monkeypatch):
    """The middleware Serve's proxy runs (``proxy_middlewares``) around a stand-in for the proxy's own answers."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from drugprot.serving.proxy import (PROXY_CALLBACK, AdmissionAtProxy, ResendOnLostReplica, RoutesGuard,
                                        StalledBodiesAtProxy, proxy_middlewares)

    assert PROXY_CALLBACK[1] == f"{proxy_middlewares.__module__}:{proxy_middlewares.__name__}"
    middleware, stalled, admission, resend = proxy_middlewares()
    assert middleware.cls is RoutesGuard and stalled.cls is StalledBodiesAtProxy and resend.cls is ResendOnLostReplica
    assert admission.cls is AdmissionAtProxy
    proxy = [Route("/-/routes", lambda _: JSONResponse({"/": "drugprot"})), Route("/-/healthz", lambda _: JSONResponse("ok"))]
    monkeypatch.setenv("DRUGPROT_API_TOKEN", "s3cret")
    with TestClient(Starlette(routes=proxy, middleware=[middleware])) as guarded:
        assert guarded.get("/-/routes").status_code == 401
        assert guarded.get("/-/routes", headers={"Authorization": "Bearer wrong"}).status_code == 401
        answer = guarded.get("/-/routes", headers={"Authorization": "Bearer s3cret"})
        assert answer.status_code == 200 and answer.json() == {"/": "drugprot"}
        assert guarded.get("/-/healthz").status_code == 200
    monkeypatch.delenv("DRUGPROT_API_TOKEN")
    with TestClient(Starlette(routes=proxy, middleware=[Middleware(RoutesGuard)])) as open_proxy:
        assert open_proxy.get("/-/routes").status_code == 200  # no token configured: as open as the API


class LosingProxy:
    """Stands in for Serve's proxy around a replica that dies: it reads the body as the proxy does (in parts, then
    listening for a disconnect), for the first ``lose`` calls sends nothing (the replica died), afterwards answers
    ``answer_status`` with the body it read."""

    def __init__(self, lose: int, *, answer_status: int = 200):
        self.lose, self.answer_status, self.calls, self.bodies, self.paths = lose, answer_status, 0, [], []

    async def __call__(self, scope, receive, send):
        self.calls += 1
        self.paths.append(scope["path"])
        scope["root_path"], scope["path"] = "/chaos", scope["path"].removeprefix("/chaos")  # as Serve's proxy does
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        if self.calls <= self.lose:
            try:  # the proxy keeps listening for a disconnect until it gives up on the request
                await asyncio.wait_for(receive(), 0.05)
            except TimeoutError:
                pass
            return
        await send({"type": "http.response.start", "status": self.answer_status, "headers": []})
        await send({"type": "http.response.body", "body": body})


def through_resend(app, *, method: str = "POST", path: str = "/v1/relations", parts=(b'{"documents": ', b"[]}"),
                   disconnect_after_body: bool = False, attempts: int = 3):
    """One request through ``ResendOnLostReplica(app)``; returns what was sent back and how often the client's
    ``receive`` was called."""
    from drugprot.serving.proxy import ResendOnLostReplica

    messages = [{"type": "http.request", "body": part, "more_body": i < len(parts) - 1} for i, part in enumerate(parts)]
    if disconnect_after_body:
        messages.append({"type": "http.disconnect"})
    sent, reads = [], [0]

    async def receive():
        reads[0] += 1
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays connected: a further read waits

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    asyncio.run(asyncio.wait_for(ResendOnLostReplica(app, attempts=attempts)(scope, receive, send), 5))
    return sent, reads[0]


def test_a_request_lost_with_its_replica_is_sent_again_with_its_body():
    app = LosingProxy(lose=2)
    sent, reads = through_resend(app, path="/chaos/v1/relations")
    assert app.calls == 3 and app.bodies == [b'{"documents": []}'] * 3  # the body replayed to each attempt
    assert app.paths == ["/chaos/v1/relations"] * 3  # each attempt gets the request as it came, not as routed
    assert reads == 2 + 2  # the body's two parts read from the client once; each lost attempt also waited for a disconnect
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"] and sent[0]["status"] == 200
    assert sent[1]["body"] == b'{"documents": []}'


def test_resending_is_bounded_and_only_for_lost_requests_that_may_be_sent_twice():
    app = LosingProxy(lose=5)
    assert through_resend(app, attempts=3)[0] == [] and app.calls == 3  # all lost: nothing sent, the server's 500
    answered = LosingProxy(lose=0, answer_status=500)
    sent, _ = through_resend(answered)
    assert answered.calls == 1 and sent[0]["status"] == 500  # an answer (even a 500) is never resent
    other = LosingProxy(lose=1)
    assert through_resend(other, path="/v1/other")[0] == [] and other.calls == 1  # a POST elsewhere: not resent
    probe = LosingProxy(lose=1)
    sent, _ = through_resend(probe, method="GET", path="/v1/model", parts=(b"",))
    assert probe.calls == 2 and sent[0]["status"] == 200
    gone = LosingProxy(lose=1)
    assert through_resend(gone, disconnect_after_body=True)[0] == [] and gone.calls == 1  # the client left


def test_the_proxy_refuses_stalled_bodies_beyond_the_caps_before_any_replica_sees_them():
    from drugprot.serving.proxy import StalledBodiesAtProxy
    from drugprot.serving.options import Limits

    async def scenario():
        app = LosingProxy(lose=0)  # reads the whole body, then answers 200
        guard = StalledBodiesAtProxy(app, limits=Limits(max_unfinished_bodies=3, max_unfinished_bodies_per_client=2,
                                                        body_idle_timeout_s=0.2))

        def request(client: str, parts: list[bytes], *, stall: bool):
            messages = [{"type": "http.request", "body": part, "more_body": stall or i < len(parts) - 1}
                        for i, part in enumerate(parts)]
            rest = asyncio.Event()
            sent = []

            async def receive():
                if messages:
                    return messages.pop(0)
                await rest.wait()  # the stalled client sends the rest of its body only when told
                return {"type": "http.request", "body": b"]}", "more_body": False}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": "/v1/relations", "client": (client, 1), "headers": []}
            return asyncio.create_task(guard(scope, receive, send)), rest, sent

        held = [request("10.0.0.1", [b'{"documents": ['], stall=True) for _ in range(2)]
        await asyncio.sleep(0.05)
        refused = request("10.0.0.1", [b'{"documents": ['], stall=True)  # a third from the same address
        other = request("10.0.0.2", [b'{"documents": ['], stall=True)  # another address: the third overall
        overall = request("10.0.0.3", [b'{"documents": ['], stall=True)  # the fourth overall
        whole = request("10.0.0.1", [b'{"documents": []}'], stall=False)  # a body that comes whole never counts
        await asyncio.wait_for(asyncio.gather(refused[0], overall[0], whole[0]), 5)
        statuses = [task[2][0]["status"] for task in (refused, overall, whole)]
        calls_while_full = app.calls
        held[0][1].set()  # the first stalled body arrives whole: its slot is free again
        await asyncio.wait_for(held[0][0], 5)
        again = request("10.0.0.1", [b'{"documents": ['], stall=True)
        await asyncio.sleep(0.05)
        admitted_again = not again[0].done()
        silent = request("10.0.0.4", [], stall=True)  # headers, then not a byte of the body
        await asyncio.wait_for(silent[0], 5)
        for task, rest, _ in (held[1], other, again):
            rest.set()
            await asyncio.wait_for(task, 5)
        return statuses, calls_while_full, held[0][2][0]["status"], admitted_again, silent[2][0]["status"], guard

    statuses, calls_while_full, first_status, admitted_again, silent_status, guard = asyncio.run(scenario())
    assert statuses == [429, 503, 200]
    assert calls_while_full == 4  # the two held, the other address's and the whole body; no refused one
    assert first_status == 200 and admitted_again and silent_status == 408
    assert guard.unfinished.admit("10.0.0.9") is None  # every slot was given back


class CapacityApp:
    """Stands in for an application that admits ``capacity`` requests at once and refuses the rest for overload
    (503, ``Retry-After: 3`` and the overload header, as the ingress does) after a round trip; each admitted request
    holds its slot until ``release`` is set."""

    def __init__(self, capacity: int):
        from drugprot.serving.service import OVERLOAD_HEADER

        self.capacity, self.running, self.calls, self.release = capacity, 0, 0, asyncio.Event()
        self.header = OVERLOAD_HEADER.lower().encode()

    async def __call__(self, scope, receive, send):
        self.calls += 1
        await asyncio.sleep(0)  # the round trip to a replica: requests sent together are all on their way
        if self.running >= self.capacity:
            headers = [(b"retry-after", b"3"), (self.header, b"1"), (b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            return await send({"type": "http.response.body", "body": b'{"detail": "queue full"}'})
        self.running += 1
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def through_admission(gate, path: str = "/app/v1/relations"):
    """One POST through ``gate`` (an AdmissionAtProxy) as a task; returns (task, what was sent back)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    return asyncio.create_task(gate(scope, receive, send)), sent


def test_the_proxy_learns_capacity_from_overload_refusals_and_refuses_the_excess_itself():
    from drugprot.serving.proxy import AdmissionAtProxy

    async def scenario():
        app, now = CapacityApp(capacity=4), [0.0]
        gate = AdmissionAtProxy(app, clock=lambda: now[0])
        first = [through_admission(gate) for _ in range(6)]  # no limit yet: all six reach the app, two refused there
        await asyncio.sleep(0.01)
        assert app.calls == 6 and gate.refused == 0
        assert [sent[0]["status"] for _, sent in first if sent] == [503, 503]
        assert gate.limit["/app"] == 4.0  # each refusal of the burst lowered it to what the app held then (6 - 1, 5 - 1)
        assert gate.probe_rounds["/app"] == 1 and gate.cuts["/app"] == 1  # one round: backed off once
        more = [through_admission(gate) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert app.calls == 6 and gate.refused == 3  # refused at the proxy, never reaching the app
        assert all(json.loads(sent[1]["body"])["detail"].startswith(gate.AT_CAPACITY) for _, sent in more)
        assert all(sent[0]["status"] == 503 and dict(sent[0]["headers"])[b"retry-after"] == b"3" for _, sent in more)
        other = through_admission(gate, path="/other/v1/relations")  # another application: its own (no) limit
        await asyncio.sleep(0.01)
        assert app.calls == 7 and other[1][0]["status"] == 503
        app.release.set()
        await asyncio.gather(*(task for task, _ in first + more))
        raised = 4.0  # requests were refused here within DEMAND_S: each of the four 2xx answers raised the limit
        for _ in range(4):
            raised += 1 / raised
        assert gate.limit["/app"] == pytest.approx(raised) and sum(gate.in_flight.values()) == 0
        app.release.clear()
        now[0] += gate.DEMAND_S  # a while later, nothing refused here since
        calm = [through_admission(gate) for _ in range(2)]  # below the limit: nothing refused, no demand
        await asyncio.sleep(0.01)
        app.release.set()
        await asyncio.gather(*(task for task, _ in calm))
        assert gate.limit["/app"] == pytest.approx(raised)  # answers without demand beyond the limit raise nothing

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_admission_probing_backs_off_while_probes_fail_and_resumes_when_capacity_grows():
    from drugprot.serving.proxy import AdmissionAtProxy
    from drugprot.serving.service import OVERLOAD_HEADER

    gate = AdmissionAtProxy(None, clock=lambda: 0.0)
    overload = [(OVERLOAD_HEADER.lower().encode(), b"1"), (b"retry-after", b"2")]
    gate.in_flight["/a"] = 9
    for rounds in (1, 2, 4, 8, 16, 32, 64, 64):  # each refused probe doubles the rounds between probes, up to the cap
        gate._learn("/a", gate.cuts["/a"], 503, overload)
        assert gate.probe_rounds["/a"] == rounds and gate.limit["/a"] == 8.0 and gate.retry_after["/a"] == "2"
    gate._learn("/a", gate.cuts["/a"] - 1, 503, overload)  # admitted before the last cut: no new cut
    assert gate.probe_rounds["/a"] == 64
    gate.refused_at["/a"] = 0.0  # demand beyond the limit
    answers = 0
    while gate.probe_rounds["/a"] != 1:  # capacity was added: answers succeed past the limit last refused (8)
        gate._learn("/a", gate.cuts["/a"], 200, [])
        answers += 1
    assert gate.limit["/a"] >= 9.0 and 64 * 8 <= answers <= 64 * 9  # 1/(64 × limit) per answer
    before = gate.limit["/a"]
    gate._learn("/a", gate.cuts["/a"], 200, [])
    assert gate.limit["/a"] == pytest.approx(before + 1 / before)  # probing every round again


def test_admission_at_the_proxy_passes_other_routes_and_methods_untouched():
    from drugprot.serving.proxy import AdmissionAtProxy

    async def scenario():
        app = CapacityApp(capacity=0)  # refuses every request it sees
        gate = AdmissionAtProxy(app)
        gate.limit["/app"] = 1.0
        gate.in_flight["/app"] = 5  # far over the limit
        _, sent = through_admission(gate, path="/app/v1/model")
        await asyncio.sleep(0.01)
        assert app.calls == 1 and sent[0]["status"] == 503  # not a relations request: always reaches the app

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_token_comes_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("DRUGPROT_TEST_TOKEN", " abc ")
    assert resolve_token("DRUGPROT_TEST_TOKEN") == "abc"
    monkeypatch.delenv("DRUGPROT_TEST_TOKEN")
    assert resolve_token("DRUGPROT_TEST_TOKEN") is None and resolve_token(None) is None
    with pytest.raises(DrugprotError, match="require_token is set but the environment variable DRUGPROT_TEST_TOKEN is empty"):
        resolve_token("DRUGPROT_TEST_TOKEN", required=True)


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


def test_model_info_and_openapi(client):
    info = client.get("/v1/model").json()
    assert info["vote"] == "soft" and info["interval"] == [-10, 16] and len(info["members"]) == 3
    assert {m["encoder"] for m in info["members"]} == {"tiny-random"} and info["precision"] == "fp32"
    assert info["limits"]["max_pairs"] == 300
    schema = client.get("/openapi.json").json()
    assert {"/v1/relations", "/v1/model", "/healthz", "/readyz"} <= set(schema["paths"])
    assert "413" in schema["paths"]["/v1/relations"]["post"]["responses"]


# Serve gives ingress replicas an ``async def __del__`` that it awaits itself; garbage-collected here it would only warn.
NEVER_COLLECTED: list = []


def test_the_serve_deployment_classes_work_without_serve(relation_members, dev_documents, monkeypatch):
    """The deployments' own constructors, called directly (no cluster): the model replica is warm when its constructor
    returns (so Serve routes nothing to it before), and the ingress refuses to start without a required token."""
    from drugprot.serving.app import IngressDeployment, ModelDeployment

    cls = ModelDeployment.func_or_class
    replica = object.__new__(cls)
    NEVER_COLLECTED.append(replica)
    cls.__init__(replica, {"model": str(relation_members[0]), "warmup_rounds": 1})
    assert replica.service.state == "ready"
    replica.check_health()
    documents = dev_documents[:2]
    job = Job(documents, replica.service.predictor.candidates(documents))
    scored = asyncio.run(replica.score(job))
    assert asyncio.run(replica.plan()).rule.mode == "hard" and scored.version is None
    assert torch.equal(scored.probabilities, run_jobs(replica.service.predictor.scorer, [job])[0])
    ingress = IngressDeployment.func_or_class
    monkeypatch.delenv("DRUGPROT_UNIT_TOKEN", raising=False)
    refused = object.__new__(ingress)
    NEVER_COLLECTED.append(refused)
    with pytest.raises(DrugprotError, match="require_token is set"):
        asyncio.run(ingress.__init__(refused, {"model": str(relation_members[0]), "require_token": True,
                                               "token_env": "DRUGPROT_UNIT_TOKEN"}, None))


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


def test_a_cpu_replica_can_serve_the_int8_path_of_drugprot_predict(relation_members, dev_documents):
    """--precision int8 on drugprot serve: the replica's predictor quantizes its Linear layers as predict's does, and
    /v1/model says so; the default stays fp32 on CPU; --precision cascade reaches the predictor too."""
    from drugprot.cli import build_parser
    from drugprot.cli.serve import serve_options

    args = build_parser().parse_args(["serve", "--model", str(relation_members[0]), "--precision", "int8"])
    quantized = ModelService.load(parse_options({**serve_options(args), "warmup_rounds": 0}))
    plain = ModelService.load(parse_options({"model": str(relation_members[0]), "warmup_rounds": 0}))
    assert (quantized.model_info().precision, plain.model_info().precision) == ("int8", "fp32")
    linear = [type(m).__module__ for m in quantized.predictor.members[0].model.modules() if "Linear" in type(m).__name__]
    assert linear and all("quantized" in module for module in linear)
    documents = dev_documents[:3]
    reference = Predictor([load_artifact(relation_members[0])], device="cpu", precision="int8")
    assert quantized.predictor.member_probabilities(documents, quantized.predictor.candidates(documents)).equal(
        reference.member_probabilities(documents, reference.candidates(documents)))
    args = build_parser().parse_args(["serve", "--model", str(relation_members[0]), "--precision", "cascade"])
    cascade = ModelService.load(parse_options({**serve_options(args), "warmup_rounds": 0}))
    assert cascade.model_info().precision == "cascade" and cascade.predictor.precision == "cascade"


# ---- fuzz: nothing a client sends crashes the app ----------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25)
entity_like = st.fixed_dictionaries(
    {"id": st.one_of(st.text(max_size=5), st.integers()), "type": st.sampled_from(["CHEMICAL", "GENE", "GENE-Y", "GENE-N", "X", ""]),
     "start": st.integers(-5, 60), "end": st.integers(-5, 60)},
    optional={"text": st.text(max_size=8), "extra": json_values})
document_like = st.fixed_dictionaries(
    {"id": st.one_of(st.text(max_size=6), st.integers(), st.none())},
    optional={"text": st.text(max_size=60), "title": st.text(max_size=30), "abstract": st.text(max_size=30),
              "entities": st.lists(entity_like, max_size=6)})
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"documents": st.lists(document_like, max_size=4)},
                          optional={"interval": json_values, "threshold": json_values}),
)


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies, raw=st.binary(max_size=64), as_raw=st.booleans())
def test_fuzzed_bodies_never_crash_the_app(client, body, raw, as_raw):
    if as_raw:
        response = client.post("/v1/relations", content=raw, headers={"content-type": "application/json"})
    else:
        response = client.post("/v1/relations", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert response.status_code in (200, 413, 422), (response.status_code, response.text)
    if response.status_code != 200:
        assert response.json()["detail"]
    else:
        assert len(response.json()["documents"]) == len(body["documents"])


def test_the_app_still_answers_after_the_fuzz(client):
    assert client.post("/v1/relations", json={"documents": [one_doc()]}).status_code == 200
    assert client.service.model.batcher.stats.failed_batches == 0


# ---- stalled bodies: timeouts and caps on unfinished uploads ------------------------------------------------------
async def asgi_post(app, parts: list[bytes], *, stall: bool, client: str = "10.0.0.1") -> tuple[int, dict]:
    """POST /v1/relations straight into the ASGI app; ``stall`` leaves the body unfinished after ``parts``."""
    messages = [{"type": "http.request", "body": part, "more_body": stall or i < len(parts) - 1}
                for i, part in enumerate(parts)]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # the client sends nothing more

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/relations", "raw_path": b"/v1/relations", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "client": (client, 5000), "server": ("x", 80)}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


def test_stalled_bodies_time_out_and_cannot_crowd_out_whole_requests(ensemble):
    service = service_for(ensemble, limits={"body_timeout_s": 5, "body_idle_timeout_s": 0.5, "max_unfinished_bodies": 3,
                                            "max_unfinished_bodies_per_client": 2})
    app = create_api(service)
    whole = json.dumps({"documents": [one_doc()]}).encode()

    async def scenario():
        stalled = [asyncio.create_task(asgi_post(app, [b'{"documents": ['], stall=True)) for _ in range(2)]
        await asyncio.sleep(0.1)
        third = await asgi_post(app, [b'{"documents": ['], stall=True)  # same address, over its share
        other = await asgi_post(app, [b'{"documents": ['], stall=True, client="10.0.0.2")  # a new address: admitted
        ordinary = await asgi_post(app, [whole], stall=False)  # whole in its first part: never counted
        return third, ordinary, await asyncio.gather(*stalled), other

    third, ordinary, stalled, other = asyncio.run(scenario())
    assert third[0] == 429 and "too many unfinished requests from 10.0.0.1" in third[1]["detail"]
    assert ordinary[0] == 200 and ordinary[1]["documents"][0]["candidates"] == 1
    assert [status for status, _ in stalled] == [408, 408] and other[0] == 408
    assert stalled[0][1]["detail"] == ("request body: not received in time (a body must arrive within 5 s, "
                                       "pausing at most 0.5 s)")

    async def crowd():
        held = [asyncio.create_task(asgi_post(app, [b"{"], stall=True, client=f"10.1.0.{i}")) for i in range(3)]
        await asyncio.sleep(0.1)
        refused = await asgi_post(app, [b"{"], stall=True, client="10.1.0.9")
        await asyncio.gather(*held)
        return refused

    status, body = asyncio.run(crowd())
    assert status == 503 and body["detail"] == "server busy receiving other requests; retry shortly"


def test_the_page_is_served_without_a_token_and_carries_the_bundled_example(ensemble, dev_documents):
    with TestClient(create_api(service_for(ensemble), token="s3cret")) as secured:
        page = secured.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert secured.get("/v1/model").status_code == 401  # the API behind it still needs the token
    example = json.loads(re.search(r'<script id="example" type="application/json">(.*?)</script>', page.text, re.S)[1])
    first = dev_documents[0]
    assert (example["title"], example["abstract"]) == (first.title, first.abstract)
    assert len(example["entities"]) == len(first.entities)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text) and "fetch(\"v1/relations\"" in page.text


def test_the_scrape_config_and_the_docs_name_the_metrics_port_drugprot_serve_uses():
    from drugprot.cli.serve import METRICS_PORT

    scrape = yaml.safe_load((REPO / "infra" / "prometheus" / "scrape.yaml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [f"127.0.0.1:{METRICS_PORT}"]
    assert f"| `--metrics-port N` | {METRICS_PORT} |" in (REPO / "docs" / "serving.md").read_text()


def test_the_grafana_dashboard_queries_only_series_the_app_exports():
    """Every drugprot series a panel queries is one serving.metrics defines (Ray adds the ray_ prefix)."""
    dashboard = json.loads((REPO / "infra" / "grafana" / "drugprot-serving.json").read_text())
    source = (REPO / "platform" / "drugprot" / "serving" / "metrics.py").read_text()
    defined = set(re.findall(r'(?:Counter|Gauge|Histogram)\("(drugprot_\w+)"', source))
    queried = {m for panel in dashboard["panels"] for target in panel["targets"]
               for m in re.findall(r"ray_(drugprot_\w+?)(?:_total|_bucket|_sum|_count)?\b", target["expr"])}
    assert queried and queried <= defined, queried - defined
    assert queried == defined  # and every series has a panel
