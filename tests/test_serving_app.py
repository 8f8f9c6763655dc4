"""serving.app: the YAML configs import the builder, and the deployment classes work called directly (no cluster)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import yaml

from drugprot.errors import DrugprotError
from drugprot.serving.batching import Job, run_jobs
from drugprot.serving.options import parse_options

REPO = Path(__file__).resolve().parents[1]


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
