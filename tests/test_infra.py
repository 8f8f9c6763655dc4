"""infra/: the manifests parse, use real KubeRay / Ray / MLflow fields, run `drugprot` commands the CLI accepts, point at
files that exist, agree with each other (image, sizes, serve config, pins), and the rehearsal cluster script works.

The KubeRay folder is rendered (``kubectl kustomize`` where kubectl is installed, else a small Python renderer of
the kustomize features it uses) and every Ray resource is validated with jsonschema against the operator's own CRD
schema (../shared/kuberay-crds), strictly: a field the schema does not list is an error, with its path. The
cluster-launcher file goes through Ray's own ``prepare_config`` + ``validate_config`` (ray-schema.json); the MLflow
command is checked against ``mlflow server``'s click options.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from fixtures_mlflow import mlflow_server  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster-launcher" / "aws-gpu.yaml"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
LOCAL_CLUSTER = INFRA / "local-cluster.sh"

IMAGE_PLACEHOLDER = "drugprot-platform"


def load_all(path: Path) -> list:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def load_one(path: Path) -> dict:
    docs = load_all(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def infra_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and p.name.endswith(suffixes))


# --- every YAML file parses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", infra_files(".yaml", ".yml"), ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path):
    docs = load_all(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document should be a mapping"


def test_infra_has_the_expected_files():
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayservice.yaml", "kuberay/kustomization.yaml",
                 "cluster-launcher/aws-gpu.yaml", "mlflow/docker-compose.yaml", "mlflow/README.md",
                 "docker/Dockerfile", "local-cluster.sh", "README.md"):
        assert (INFRA / name).is_file(), f"infra/{name} is missing"
    assert os.access(LOCAL_CLUSTER, os.X_OK), "infra/local-cluster.sh should be executable"


def test_local_cluster_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(LOCAL_CLUSTER)], check=True)


# --- KubeRay: rendered manifests against the operator's own CRD schemas, strictly --------------------------------

CRDS = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}


def strict(schema):
    """The CRD schema as ``kubectl apply --validate=strict`` reads it: an object that lists its ``properties`` admits
    no other field unless it says ``x-kubernetes-preserve-unknown-fields`` (structural schemas prune the rest)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: (dict((name, strict(sub)) for name, sub in value.items()) if key == "properties" else strict(value))
           for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str):
    import jsonschema

    if not (CRDS / CRD_FILES[kind]).is_file():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (the shared folder next to the checkout)")
    with (CRDS / CRD_FILES[kind]).open(encoding="utf-8") as handle:
        crd = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 3 MB of YAML
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: dict) -> list[str]:
    """Every violation of the document's CRD schema as ``KIND NAME: PATH: what is wrong``, the unknown field's own
    path for a field the schema does not know."""
    errors = []
    for error in crd_validator(doc["kind"]).iter_errors(doc):
        where = error.json_path
        if error.validator == "additionalProperties":
            unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            errors.extend(f"{doc['kind']} {doc['metadata']['name']}: {where}.{name}: unknown field" for name in unknown)
        else:
            errors.append(f"{doc['kind']} {doc['metadata']['name']}: {where}: {error.message}")
    return sorted(errors)


def field_path(node, path: str):
    """``node`` at a kustomize field path (``a.b.[name=x].c``), created where missing for the last step."""
    parts = path.split(".")
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part.startswith("[") and part.endswith("]"):
            key, value = part[1:-1].split("=", 1)
            node = next(item for item in node if str(item.get(key)) == value)
        elif last:
            return node, part
        else:
            node = node[part]
    raise ValueError(f"{path}: ends on a list selector")


def render_python(folder: Path) -> list[dict]:
    """The subset of kustomize that infra/kuberay uses (namespace, labels, images, an env-file ConfigMap, replacements,
    local-config resources), for machines without kubectl."""
    kustomization = load_one(folder / "kustomization.yaml")
    docs = [doc for resource in kustomization["resources"] for doc in load_all(folder / resource)]
    for generator in kustomization.get("configMapGenerator", []):
        data = {}
        for env in generator.get("envs", []):
            for line in (folder / env).read_text().splitlines():
                if line.strip() and not line.strip().startswith("#"):
                    key, value = line.strip().split("=", 1)
                    data[key] = value
        docs.insert(0, {"apiVersion": "v1", "kind": "ConfigMap", "data": data,
                        "metadata": {"name": generator["name"], "labels": dict(generator.get("options", {}).get("labels", {}))}})
    for replacement in kustomization.get("replacements", []):
        source = replacement["source"]
        origin = next(d for d in docs if d["kind"] == source["kind"] and d["metadata"]["name"] == source["name"])
        parent, key = field_path(origin, source["fieldPath"])
        for target in replacement["targets"]:
            for doc in (d for d in docs if d["kind"] == target["select"]["kind"]):
                for path in target["fieldPaths"]:
                    node, leaf = field_path(doc, path)
                    node[leaf] = yaml.safe_load(yaml.safe_dump(parent[key]))
    docs = [d for d in docs if d["metadata"].get("annotations", {}).get("config.kubernetes.io/local-config") != "true"]
    images = {image["name"]: f"{image['newName']}:{image['newTag']}" for image in kustomization.get("images", [])}
    for doc in docs:
        doc["metadata"]["namespace"] = kustomization["namespace"]
        for labels in kustomization.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(labels["pairs"])
        for container in pod_containers(doc):
            container["image"] = images.get(container["image"], container["image"])
    return docs


def pod_containers(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers"):
                yield from value
            else:
                yield from pod_containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from pod_containers(item)


def render_kustomize(folder: Path) -> list[dict]:
    """``kubectl kustomize FOLDER`` where kubectl is installed, else :func:`render_python`."""
    if shutil.which("kubectl") is None:
        return render_python(folder)
    rendered = subprocess.run(["kubectl", "kustomize", str(folder)], check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


@functools.cache
def rendered_kuberay() -> str:
    return yaml.safe_dump_all(render_kustomize(KUBERAY))


def rendered(kind: str) -> dict:
    """A fresh copy of the rendered resource of ``kind`` (tests may change it)."""
    return next(doc for doc in yaml.safe_load_all(rendered_kuberay()) if doc["kind"] == kind)


def test_rendered_ray_resources_validate_strictly_against_the_kuberay_crds():
    docs = [doc for doc in yaml.safe_load_all(rendered_kuberay()) if doc["kind"] in CRD_FILES]
    assert sorted(doc["kind"] for doc in docs) == sorted(CRD_FILES)
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
        assert schema_errors(doc) == [], doc["kind"]


@pytest.mark.parametrize("kind, path, value, message", [
    ("RayCluster", "spec.headGroupSpec.template.spec.containers.[name=ray-head].resourcs", {},
     r"RayCluster drugprot: \$.spec.headGroupSpec.template.spec.containers\[0\].resourcs: unknown field"),
    ("RayJob", "spec.shutdownAfterJobFinish", True, r"RayJob drugprot-tune-paper: \$.spec.shutdownAfterJobFinish: unknown field"),
    ("RayService", "spec.rayClusterConfig.workerGroupSpecs.[groupName=gpu].maxReplica", 4,
     r"\$.spec.rayClusterConfig.workerGroupSpecs\[0\].maxReplica: unknown field"),
    ("RayCluster", "spec.workerGroupSpecs.[groupName=gpu].minReplicas", "two",
     r"\$.spec.workerGroupSpecs\[0\].minReplicas: 'two' is not of type 'integer'"),
    ("RayJob", "spec.rayClusterSpec.enableInTreeAutoscaling", "yes",
     r"\$.spec.rayClusterSpec.enableInTreeAutoscaling: 'yes' is not of type 'boolean'"),
    ("RayService", "spec.rayClusterConfig.headGroupSpec.template.spec.containers.[name=ray-head].ports.[name=serve].containerPort",
     "8000", r"\$.spec.rayClusterConfig.headGroupSpec.template.spec.containers\[0\].ports\[\d\].containerPort: '8000' is not of type 'integer'"),
])
def test_a_misspelt_or_mistyped_field_fails_with_its_path(kind, path, value, message):
    doc = rendered(kind)
    node, leaf = field_path(doc, path)
    node[leaf] = value
    errors = schema_errors(doc)
    assert len(errors) == 1 and re.search(message, errors[0]), errors


def test_the_python_renderer_agrees_with_kubectl_kustomize():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the Python renderer is what the other tests use")
    assert sorted(render_python(KUBERAY), key=lambda d: d["kind"]) == sorted(render_kustomize(KUBERAY),
                                                                             key=lambda d: d["kind"])


def check_pod_template(template: dict, where: str, container_name: str) -> dict:
    spec = template["spec"]
    names = [c["name"] for c in spec["containers"]]
    assert names[0] == container_name, f"{where}: the Ray container must come first and be named {container_name}"
    container = spec["containers"][0]
    assert container["image"] == IMAGE_PLACEHOLDER, f"{where}: image {container['image']!r} (kustomization sets it)"
    config_maps = [src["configMapRef"]["name"] for src in container.get("envFrom", []) if "configMapRef" in src]
    assert "drugprot-config" in config_maps, f"{where}: needs envFrom the ConfigMap drugprot-config"
    assert container.get("workingDir") == "/app", f"{where}: relative config paths resolve against /app in the image"
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    assert "/dev/shm" in mounts, f"{where}: Ray's object store needs a larger /dev/shm than the 64 MB default"
    volumes = {v["name"] for v in spec.get("volumes", [])}
    assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes, f"{where}: a volumeMount has no volume"
    return container


def check_ray_cluster_spec(spec: dict, where: str) -> dict:
    import ray

    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion {spec['rayVersion']} != Ray {ray.__version__}"
    assert spec["authOptions"]["mode"] == "token", f"{where}: Ray 2.60 token auth should stay on in a shared cluster"
    assert spec["authOptions"]["secretName"] == "drugprot-ray-auth"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["upscalingMode"] in {"Default", "Aggressive", "Conservative"}

    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values must be strings"
    head_container = check_pod_template(head["template"], f"{where}.headGroupSpec", "ray-head")
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert ports.get("gcs-server") == 6379 and ports.get("dashboard") == 8265, f"{where}: head ports {ports}"

    groups = spec["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["gpu"], f"{where}: one worker group named gpu"
    for group in groups:
        assert isinstance(group["minReplicas"], int) and isinstance(group["maxReplicas"], int)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        check_pod_template(group["template"], f"{where}.workerGroupSpecs[gpu]", "ray-worker")
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{where}: GPU nodes are usually tainted"
    return spec


def test_raycluster_manifest():
    doc = load_one(KUBERAY / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["labels"]["app.kubernetes.io/component"] == "cluster"
    check_ray_cluster_spec(doc["spec"], "RayCluster.spec")


def test_rayjob_manifest():
    doc = load_one(KUBERAY / "rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert doc["metadata"]["labels"]["app.kubernetes.io/component"] == "tune"
    spec = doc["spec"]
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
    assert spec["entrypoint"].startswith("drugprot tune ")
    check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob.spec.rayClusterSpec")

    # $(VAR) in the entrypoint is expanded by Kubernetes in the submitter container (K8sJobMode puts the entrypoint
    # into its args): each variable must come from that container's environment, i.e. the ConfigMap.
    assert spec["submissionMode"] == "K8sJobMode"
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    container = submitter["containers"][0]
    assert container["image"] == IMAGE_PLACEHOLDER
    assert "command" not in container, "KubeRay fills in the submit command only when none is given"
    assert {"configMapRef": {"name": "drugprot-config"}} in container["envFrom"]
    params = kuberay_params()
    references = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", spec["entrypoint"]))
    assert references == {"MLFLOW_TRACKING_URI", "DRUGPROT_TUNE_STORAGE"}
    assert references <= set(params), f"{references - set(params)} not in infra/kuberay/params.env"
    assert params["DRUGPROT_TUNE_STORAGE"].startswith("s3://"), "trial storage must be shared by all nodes"


def test_rayservice_manifest_mirrors_serve_cluster_yaml():
    doc = load_one(KUBERAY / "rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    assert doc["metadata"]["labels"]["app.kubernetes.io/component"] == "serve"
    spec = doc["spec"]
    assert spec["upgradeStrategy"]["type"] in {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
    cluster = check_ray_cluster_spec(spec["rayClusterConfig"], "RayService.spec.rayClusterConfig")

    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML document inside a string"
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    applications = serve_config["applications"]
    assert applications and all(app["import_path"] == "drugprot.serving:build_app" for app in applications)
    assert applications[0]["args"]["model"] == "models:/drugprot@champion"
    cluster_yaml = REPO / "serve" / "cluster.yaml"
    assert cluster_yaml.is_file(), "serve/cluster.yaml is missing"
    assert serve_config == yaml.safe_load(cluster_yaml.read_text()), (
        "RayService serveConfigV2 differs from serve/cluster.yaml: copy the file's content into serveConfigV2")

    # The builder's arguments are valid, and the API token the replicas require reaches the worker pods.
    from drugprot.serving.options import parse_options

    options = parse_options(applications[0]["args"])
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": serve_config["http_options"]["port"]} in head["ports"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    if options.token_env:
        env = {e["name"]: e for e in worker.get("env", [])}
        assert options.token_env in env, f"worker pods need {options.token_env} (require_token={options.require_token})"
        assert "secretKeyRef" in env[options.token_env]["valueFrom"]
    # Serve's proxy (on every node) answers /-/routes itself: the proxy middleware asks for the same token there
    from drugprot.serving.proxy import PROXY_CALLBACK

    for pod in (head, worker):
        env = {e["name"]: e for e in pod.get("env", [])}
        assert env[PROXY_CALLBACK[0]]["value"] == PROXY_CALLBACK[1]
        assert "secretKeyRef" in env["DRUGPROT_API_TOKEN"]["valueFrom"]


# --- KubeRay: the parameters and how they reach the manifests -----------------------------------------------------


def kuberay_params() -> dict[str, str]:
    params = {}
    for line in (KUBERAY / "params.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            params[key] = value
    return params


def sizing() -> dict:
    return load_one(KUBERAY / "sizing.yaml")["spec"]


def quantity(value) -> float:
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_kustomization_parameters():
    kustomization = load_one(KUBERAY / "kustomization.yaml")
    assert set(kustomization["resources"]) == {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "networkpolicy.yaml",
                                               "sizing.yaml", "security.yaml"}
    for resource in kustomization["resources"]:
        assert (KUBERAY / resource).is_file()
    assert [image["name"] for image in kustomization["images"]] == [IMAGE_PLACEHOLDER]
    generator = kustomization["configMapGenerator"][0]
    assert generator["name"] == "drugprot-config" and generator["envs"] == ["params.env"]
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True, (
        "pod templates inside KubeRay resources are not rewritten to a hash-suffixed ConfigMap name")
    params = kuberay_params()
    assert params["MLFLOW_TRACKING_URI"].startswith("http"), params
    # Tune would otherwise move each trial into its own folder, away from /app where data/drugprot is.
    assert params["RAY_CHDIR_TO_TRIAL_DIR"] == "0"
    sources = {doc["kind"]: doc for doc in (load_one(KUBERAY / "sizing.yaml"), load_one(KUBERAY / "security.yaml"))}
    for doc in sources.values():
        assert doc["metadata"]["annotations"]["config.kubernetes.io/local-config"] == "true"
    for replacement in kustomization["replacements"]:
        source = replacement["source"]
        node = sources[source["kind"]]
        for part in source["fieldPath"].split("."):
            node = node[part]
        assert node is not None, source


def test_sizes_fit_the_workloads():
    """Pod sizes, worker bounds, trial resources and Serve replicas agree with one another."""
    size = sizing()
    limits = size["gpuWorker"]["resources"]["limits"]
    assert size["gpuWorker"]["resources"]["requests"] == limits, "requests = limits: Ray sees exactly what it gets"
    worker_cpus, worker_gpus = quantity(limits["cpu"]), quantity(limits["nvidia.com/gpu"])

    entry = shlex.split(re.sub(r"\$\((\w+)\)", r"\1", load_one(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"]))
    flags = dict(zip(entry[2::2], entry[3::2]))
    gpus_per_trial, cpus_per_trial = float(flags["--gpus-per-trial"]), float(flags["--cpus-per-trial"])
    trials_per_worker = int(worker_gpus / gpus_per_trial)
    assert trials_per_worker * cpus_per_trial <= worker_cpus, "a GPU worker lacks the CPUs for its trials"
    assert int(flags["--max-concurrent"]) == size["tune"]["maxReplicas"] * trials_per_worker, (
        "--max-concurrent should be what the largest cluster runs at once")
    assert 0 <= size["tune"]["minReplicas"] <= size["tune"]["maxReplicas"]

    application = yaml.safe_load(load_one(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])["applications"][0]
    serve_args = application["args"]
    assert serve_args["num_cpus"] <= worker_cpus and serve_args.get("gpus_per_replica", 0) <= worker_gpus
    model = {d["name"]: d for d in application.get("deployments", [])}.get("DrugprotModel", {})
    if model.get("autoscaling_config"):  # the model deployment's replicas hold the GPUs
        low, high = model["autoscaling_config"]["min_replicas"], model["autoscaling_config"]["max_replicas"]
        per_worker = int(worker_gpus // serve_args["gpus_per_replica"]) if serve_args.get("gpus_per_replica") else 1
        assert high <= size["serve"]["maxReplicas"] * per_worker, "Serve may ask for more replicas than GPU pods"
        assert size["serve"]["minReplicas"] * per_worker >= min(low, 1)


def test_kustomize_renders_every_parameter():
    docs = list(yaml.safe_load_all(rendered_kuberay()))
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == ["ConfigMap", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy", "RayCluster", "RayJob",
                     "RayService"], kinds   # sizing.yaml and security.yaml stay local
    config_map = next(doc for doc in docs if doc["kind"] == "ConfigMap")
    assert config_map["metadata"]["name"] == "drugprot-config" and config_map["data"] == kuberay_params()
    kustomization = load_one(KUBERAY / "kustomization.yaml")
    image = kustomization["images"][0]
    expected_image = f"{image['newName']}:{image['newTag']}"
    size = sizing()

    for doc in docs:
        if doc["kind"] in ("ConfigMap", "NetworkPolicy"):
            continue
        assert doc["metadata"]["namespace"] == kustomization["namespace"]
        for container in pod_containers(doc):
            assert container["image"] == expected_image, (doc["kind"], container["name"], container["image"])
        spec = {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
                "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["resources"] == size["head"]["resources"]
        group = spec["workerGroupSpecs"][0]
        assert group["template"]["spec"]["containers"][0]["resources"] == size["gpuWorker"]["resources"]
        bounds = size["serve"] if doc["kind"] == "RayService" else size["tune"]
        assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (
            bounds["minReplicas"], bounds["minReplicas"], bounds["maxReplicas"])


# --- KubeRay: pods locked down, network closed, Ray token auth ----------------------------------------------------


def pod_templates(doc: dict) -> dict[str, dict]:
    """``{where: pod template}`` of every pod a rendered Ray resource makes (heads, workers, the RayJob submitter)."""
    spec = doc["spec"]
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[doc["kind"]]
    found = {f"{doc['kind']}.head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        found[f"{doc['kind']}.{group['groupName']}"] = group["template"]
    if "submitterPodTemplate" in spec:
        found[f"{doc['kind']}.submitter"] = spec["submitterPodTemplate"]
    return found


def ray_resources() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(rendered_kuberay()) if doc["kind"] in CRD_FILES]


def test_every_ray_pod_runs_unprivileged_on_a_read_only_root():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    uid = int(re.search(r"useradd .*--uid (\d+)", dockerfile).group(1))
    assert re.search(r"^USER ray$", dockerfile, flags=re.M) and "ENV HOME=/home/ray" in dockerfile
    templates = {where: t for doc in ray_resources() for where, t in pod_templates(doc).items()}
    assert len(templates) == 7, sorted(templates)   # head + GPU workers of three clusters, and the submitter
    for where, template in templates.items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] == uid and spec["securityContext"]["fsGroup"] == uid, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "drugprot", f"{where}: the NetworkPolicy selects it"
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["readOnlyRootFilesystem"] is True, where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            # what Ray, Python and drugprot write goes to emptyDir volumes
            writable = {"/tmp", "/home/ray"} | ({"/tmp/ray", "/app/runs", "/dev/shm"} if "ray-" in container["name"] and
                                                 "submitter" not in container["name"] else set())
            assert writable <= set(mounts), f"{where}: {sorted(writable - set(mounts))} not mounted"
            assert all("emptyDir" in volumes[mounts[path]] for path in writable), where
    for doc in ray_resources():
        cluster = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
        sidecar = cluster["autoscalerOptions"]["securityContext"]
        assert sidecar == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}, doc["kind"]
        # Ray's token auth: KubeRay sets RAY_AUTH_MODE=token and the token from the Secret on every Ray container
        assert cluster["authOptions"] == {"mode": "token", "secretName": "drugprot-ray-auth"}, doc["kind"]


def test_the_study_writes_only_to_writable_folders():
    entry = load_one(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"]
    storage = re.search(r"--optuna-storage (\S+)", entry).group(1)
    assert storage.startswith("sqlite:////app/runs/"), "the Optuna SQLite file goes to the writable /app/runs volume"
    assert kuberay_params()["HF_HUB_OFFLINE"] == "1", "the image's Hugging Face cache is read-only"


def network_policies() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(rendered_kuberay()) if doc["kind"] == "NetworkPolicy"}


# kubectl's client-side validation (`kubectl apply --dry-run=client --validate=strict`) fetches the OpenAPI schema from
# a cluster; without one, the same Kubernetes OpenAPI schemas come from kubernetes-validate, strictly (no unknown
# field). KUBERNETES_VERSION is the oldest release that the manifests promise to work on.
KUBERNETES_VERSION = "1.30.0"


def kubernetes_schema_errors(doc: dict) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{doc['kind']} {doc['metadata']['name']}: {'.'.join(map(str, error.path))}: {error.message}"]
    return []


def test_network_policies_pass_the_kubernetes_schema_strictly():
    policies = network_policies()
    assert set(policies) == {"drugprot-ray-internal", "drugprot-ray-operator", "drugprot-serve-ingress"}
    for policy in policies.values():
        assert policy["metadata"]["namespace"] == load_one(KUBERAY / "kustomization.yaml")["namespace"]
        assert kubernetes_schema_errors(policy) == []
    # and the check is a real one: a misspelt field and a mistyped port are refused
    broken = network_policies()["drugprot-serve-ingress"]
    broken["spec"]["ingress"][0]["form"] = broken["spec"]["ingress"][0].pop("from")
    assert any("form" in error for error in kubernetes_schema_errors(broken)), kubernetes_schema_errors(broken)
    mistyped = network_policies()["drugprot-ray-operator"]
    mistyped["spec"]["ingress"][0]["ports"][0]["port"] = [8265]
    assert kubernetes_schema_errors(mistyped)


def test_network_policies_open_ray_within_drugprot_and_serve_to_the_ingress_only():
    policies = network_policies()
    drugprot = {"app.kubernetes.io/name": "drugprot"}
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert drugprot.items() <= policy["spec"]["podSelector"]["matchLabels"].items()
    internal = policies["drugprot-ray-internal"]["spec"]["ingress"]
    assert internal == [{"from": [{"podSelector": {"matchLabels": drugprot}}]}], "every port, from drugprot's pods only"
    operator = policies["drugprot-ray-operator"]["spec"]
    assert operator["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert [p["port"] for p in operator["ingress"][0]["ports"]] == [8265, 52365]
    serve = policies["drugprot-serve-ingress"]["spec"]["ingress"]
    serve_port = yaml.safe_load(load_one(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])["http_options"]["port"]
    assert len(serve) == 1 and serve[0]["ports"] == [{"protocol": "TCP", "port": serve_port}]
    peer = serve[0]["from"][0]
    assert set(peer) == {"namespaceSelector", "podSelector"}, "one peer: the ingress pods in the ingress namespace"
    assert peer["namespaceSelector"]["matchLabels"] and peer["podSelector"]["matchLabels"]
    for rule in (*internal, *operator["ingress"], *serve):
        assert all("ipBlock" not in peer for peer in rule["from"]), "no address range is opened"


# --- KubeRay: the RayService pinned to the version the alias names when rendered ------------------------------------


@pytest.fixture(scope="module")
def registry(mlflow_server):
    """A real MLflow server whose model drugprot has versions 1 and 2, with @champion on 2."""
    from drugprot.mlflow_store import client as mlflow_client

    # registry_uri given explicitly: a bare MlflowClient(uri) registers wherever an earlier test left MLflow's
    # global registry URI pointing, and this module's server would then hold no model
    client = mlflow_client(mlflow_server)
    client.create_registered_model("drugprot")
    for _ in range(2):
        run = client.create_run("0")
        client.create_model_version("drugprot", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("drugprot", "champion", "2")
    return mlflow_server, client


def drugprot_manifest(*args: str, stdin: str, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """``drugprot manifest ARGS`` in this process (the CLI's own entry point), with ``stdin`` as its input."""
    import io

    from drugprot.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["manifest", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["drugprot", "manifest", *args], code, out, err)


def serve_model(doc: dict) -> str:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]["model"]


def test_rendering_pins_the_version_the_alias_names_now(registry, tmp_path, monkeypatch, capsys):
    uri, client = registry
    result = drugprot_manifest("-", "--tracking-uri", uri, "--out", str(tmp_path / "rendered.yaml"),
                               stdin=rendered_kuberay(), monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "models:/drugprot@champion -> version 2 (pinned)" in result.stderr
    docs = list(yaml.safe_load_all((tmp_path / "rendered.yaml").read_text()))
    assert sorted(d["kind"] for d in docs) == sorted(d["kind"] for d in yaml.safe_load_all(rendered_kuberay()))
    service = next(d for d in docs if d["kind"] == "RayService")
    assert serve_model(service) == "models:/drugprot/2"
    annotations = service["metadata"]["annotations"]
    assert annotations["drugprot.io/model-alias"] == "models:/drugprot@champion"
    assert annotations["drugprot.io/model-version"] == "2"
    assert annotations["drugprot.io/model-policy"].startswith("pinned:")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", annotations["drugprot.io/model-resolved-at"])
    # the rest of the Serve config is unchanged, and the resource still passes the CRD strictly
    before = yaml.safe_load(rendered("RayService")["spec"]["serveConfigV2"])
    after = yaml.safe_load(service["spec"]["serveConfigV2"])
    before["applications"][0]["args"]["model"] = "models:/drugprot/2"
    assert after == before
    assert schema_errors(service) == []
    from drugprot.serving.options import parse_options

    assert parse_options(after["applications"][0]["args"]).model == "models:/drugprot/2"

    # a promotion after rendering does not move the rendered manifest; rendering again does
    client.set_registered_model_alias("drugprot", "champion", "1")
    try:
        assert serve_model(next(d for d in yaml.safe_load_all((tmp_path / "rendered.yaml").read_text())
                                if d["kind"] == "RayService")) == "models:/drugprot/2"
        again = drugprot_manifest("-", "--tracking-uri", uri, stdin=rendered_kuberay(), monkeypatch=monkeypatch,
                                  capsys=capsys)
        assert again.returncode == 0, again.stderr
        assert serve_model(next(d for d in yaml.safe_load_all(again.stdout) if d["kind"] == "RayService")) == "models:/drugprot/1"
    finally:
        client.set_registered_model_alias("drugprot", "champion", "2")


def test_following_the_alias_is_explicit_and_recorded(registry, monkeypatch, capsys):
    uri, _ = registry
    result = drugprot_manifest("-", "--tracking-uri", uri, "--follow-alias", stdin=rendered_kuberay(),
                               monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    service = next(d for d in yaml.safe_load_all(result.stdout) if d["kind"] == "RayService")
    assert serve_model(service) == "models:/drugprot@champion"
    annotations = service["metadata"]["annotations"]
    assert annotations["drugprot.io/model-version"] == "2"
    assert annotations["drugprot.io/model-policy"].startswith("follow-alias:")
    assert schema_errors(service) == []


@pytest.mark.parametrize("stdin, args, message", [
    (None, ["--tracking-uri", "URI"], r"models:/drugprot@champion: model 'drugprot' has no alias 'champion' \(aliases: "
                                      r"@champion -> version 2, @gone -> version 1\)"),
    ("kind: ConfigMap\nmetadata: {name: x}\n", ["--tracking-uri", "URI"], r"no RayService in the input"),
    ("a: [1,\n", ["--tracking-uri", "URI"], r"stdin: not YAML"),
])
def test_rendering_refuses_what_it_cannot_pin(registry, stdin, args, message, monkeypatch, capsys):
    uri, client = registry
    text = rendered_kuberay() if stdin is None else stdin
    if stdin is None:   # an alias that does not exist
        text = text.replace("models:/drugprot@champion", "models:/drugprot@champion-typo")
        message = message.replace("alias 'champion'", "alias 'champion-typo'").replace("@champion: model",
                                                                                        "@champion-typo: model")
        client.set_registered_model_alias("drugprot", "gone", "1")
    result = drugprot_manifest("-", *[uri if a == "URI" else a for a in args], stdin=text, monkeypatch=monkeypatch,
                               capsys=capsys)
    assert result.returncode == 1, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert result.stdout == "", "nothing half-written"


# --- `drugprot …` commands in infra/ are accepted by the CLI ------------------------------------------------------


def yaml_strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from yaml_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from yaml_strings(item)


def markdown_commands(path: Path):
    """Shell lines of fenced code blocks (backslash continuations joined)."""
    in_block, pending = False, ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        text = pending + line.strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        yield text


def drugprot_invocations(text: str) -> list[list[str]]:
    """argv lists (without the program) of each `drugprot …` run in a shell command string."""
    # Kubernetes $(VAR) references stand for one word; ${VAR} / $VAR stay as they are.
    text = re.sub(r"\$\((\w+)\)", r"K8S_\1", text)
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
    except ValueError:
        return []
    found, index = [], 0
    while index < len(tokens):
        starts_command = index == 0 or tokens[index - 1] in {"&&", "||", ";", "(", "|"} or "=" in tokens[index - 1]
        if os.path.basename(tokens[index]) == "drugprot" and starts_command:
            argv = []
            index += 1
            while index < len(tokens) and tokens[index] not in {"&&", "||", ";", "(", ")", "|"}:
                argv.append(tokens[index])
                index += 1
            if argv and re.fullmatch(r"[a-z]+", argv[0]):   # a subcommand, not a bare name (labels, namespaces)
                found.append(argv)
        index += 1
    return found


def infra_drugprot_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for path in infra_files(".yaml", ".yml"):
        for doc in load_all(path):
            for text in yaml_strings(doc):
                commands += [(str(path.relative_to(REPO)), argv) for argv in drugprot_invocations(text)]
    for path in infra_files(".md"):
        for line in markdown_commands(path):
            commands += [(str(path.relative_to(REPO)), argv) for argv in drugprot_invocations(line)]
    return commands


def test_drugprot_commands_in_infra_are_found():
    commands = infra_drugprot_commands()
    sources = {(source, argv[0]) for source, argv in commands if argv}
    assert ("infra/kuberay/rayjob.yaml", "tune") in sources, sources
    assert ("infra/cluster-launcher/aws-gpu.yaml", "data") in sources, sources


@pytest.mark.parametrize("source,argv", infra_drugprot_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]))
def test_drugprot_command_is_accepted_by_the_cli(source, argv):
    check_cli_command(source, argv)


@pytest.mark.parametrize("argv, message", [
    (["tnue", "--config", "c.yaml"], r"infra/x\.yaml: `drugprot tnue --config c\.yaml`: 'tnue' is not a drugprot command "
                                     r"\(commands: .*tune"),
    (["tune", "--num-sample", "3"], r"--num-sample is not an option of drugprot tune"),
])
def test_a_typo_in_an_infra_command_fails(argv, message):
    with pytest.raises(AssertionError, match=message):
        check_cli_command("infra/x.yaml", argv)


def check_cli_command(source: str, argv: list[str]) -> None:
    """Fail unless ``drugprot ARGV`` (named in ``source``) is a command the CLI knows, with its options, and parses."""
    import argparse

    from drugprot.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert argv[0] in commands.choices, (f"{source}: `drugprot {' '.join(argv)}`: {argv[0]!r} is not a drugprot command "
                                         f"(commands: {', '.join(sorted(commands.choices))})")
    # Every --flag is one the subcommand (or its nested action) defines, as `drugprot CMD --help` lists them.
    subparser = commands.choices[argv[0]]
    nested = [a for a in subparser._actions if isinstance(a, argparse._SubParsersAction)]
    if nested and len(argv) > 1 and argv[1] in nested[0].choices:
        subparser = nested[0].choices[argv[1]]
    known = set(subparser._option_string_actions)
    for token in argv:
        if token.startswith("--"):
            assert token.split("=", 1)[0] in known, (
                f"{source}: `drugprot {' '.join(argv)}`: {token} is not an option of drugprot {argv[0]} "
                f"(options: {sorted(known)})")
    # And the whole command line parses (types, choices, required options).
    try:
        parser.parse_args(argv)
    except SystemExit as exit:
        pytest.fail(f"{source}: `drugprot {' '.join(argv)}` is refused by the CLI (exit {exit.code})")


# --- repo-relative files named by infra/ exist --------------------------------------------------------------------

REFERENCE = re.compile(r"(?<![\w./-])((?:configs|search_spaces|serve)/[\w.-]+\.ya?ml)\b")


def referenced_paths() -> list[tuple[str, str]]:
    found = set()
    for path in infra_files(".yaml", ".yml", ".md", ".sh", ".env", "Dockerfile"):
        for match in REFERENCE.finditer(path.read_text(encoding="utf-8")):
            found.add((str(path.relative_to(REPO)), match.group(1)))
    return sorted(found)


def test_infra_references_the_repository_configs():
    targets = {target for _, target in referenced_paths()}
    assert {"configs/paper-biobert.yaml", "search_spaces/paper.yaml", "serve/cluster.yaml"} <= targets, targets


@pytest.mark.parametrize("source,target", referenced_paths(), ids=lambda v: v)
def test_referenced_file_exists(source, target):
    assert (REPO / target).is_file(), f"{source} names {target}, which does not exist"


# --- the Ray cluster launcher file --------------------------------------------------------------------------------


def launcher() -> dict:
    return load_one(LAUNCHER)


def test_cluster_launcher_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(launcher())
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    workers = [t for name, t in node_types.items() if name != config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 and t["node_config"]["InstanceType"].startswith(("g", "p"))
               for t in workers), "a GPU worker type"


def test_cluster_launcher_installs_the_package_and_agrees_on_auth():
    config = launcher()
    setup = config["setup_commands"]
    torch_step = next(i for i, c in enumerate(setup) if "torch==" in c)
    package_step = next(i for i, c in enumerate(setup) if "pip install" in c and "-c constraints.txt -e ." in c)
    assert torch_step < package_step, "CUDA torch first, then the package with the constraints"
    torch_pin = re.search(r"torch==([\w.+]+)", setup[torch_step]).group(1)
    assert torch_pin == constraint_pins()["torch"]
    assert "download.pytorch.org/whl/cu" in setup[torch_step], "a CUDA build of torch"
    mounts = config["file_mounts"]
    assert any(remote.endswith("/drugprot") for remote in mounts), "the repository is synced to the nodes"
    assert any(remote.endswith("/.ray/auth_token") for remote in mounts), "the Ray token is synced to the nodes"
    # Every `ray` command on the nodes runs with the same auth mode, and the token file the nodes get.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config[key]:
            assert "RAY_AUTH_MODE=token" in command, f"{key}: {command}"
            if "ray start" in command:
                assert "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in command
                # drivers and trials resolve data/drugprot against the synced repository
                assert "cd ~/drugprot" in command and "RAY_CHDIR_TO_TRIAL_DIR=0" in command


def test_ray_start_flags_exist():
    from ray.scripts.scripts import start

    options = {opt for param in start.params for opt in param.opts}
    commands = [c.split("ray start", 1)[1] for key in ("head_start_ray_commands", "worker_start_ray_commands")
                for c in launcher()[key] if "ray start" in c]
    script = LOCAL_CLUSTER.read_text().replace("\\\n", " ")
    commands += [line.split("start_node", 1)[1] for line in script.splitlines()
                 if line.strip().startswith("start_node ")]
    assert len(commands) == 4, commands
    used = {flag for command in commands for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", command)}
    assert {"--head", "--port", "--address", "--num-cpus", "--memory", "--object-store-memory",
            "--include-dashboard"} <= used, used
    assert used <= options, f"not `ray start` options: {sorted(used - options)}"


# --- MLflow tracking server stack ---------------------------------------------------------------------------------


def compose() -> dict:
    return load_one(COMPOSE)


def mlflow_server_argv() -> list[str]:
    command = compose()["services"]["mlflow"]["command"]
    script = command[-1] if isinstance(command, list) else command
    argv = shlex.split(script.replace("$$", "$"))
    start = argv.index("mlflow")
    assert argv[start + 1] == "server"
    return argv[start + 2:]


def test_compose_services_and_binding():
    services = compose()["services"]
    assert {"postgres", "minio", "minio-init", "mlflow"} <= set(services)
    assert "ports" not in services["postgres"], "the database is reachable on the compose network only"
    for name in ("mlflow", "minio"):
        for port in services[name]["ports"]:
            assert re.match(r"^\$\{\w+:-127\.0\.0\.1\}:\d+:\d+$", port), f"{name}: publish on loopback by default: {port}"
    depends = services["mlflow"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["minio-init"]["condition"] == "service_completed_successfully"


def test_mlflow_server_command_uses_real_options():
    from mlflow.cli import server

    options = {opt for param in server.params for opt in param.opts}
    argv = mlflow_server_argv()
    flags = [token for token in argv if token.startswith("--")]
    assert set(flags) <= options, f"not `mlflow server` options: {sorted(set(flags) - options)}"
    values = dict(zip(argv[::2], argv[1::2]))
    assert values["--backend-store-uri"].startswith("postgresql")
    assert values["--artifacts-destination"].startswith("s3://")
    assert values["--host"] == "0.0.0.0" and values["--port"] == "5000"
    import configparser

    auth = configparser.ConfigParser()
    auth.read(INFRA / "mlflow" / "basic_auth.ini")
    assert auth["mlflow"]["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert "admin_password" not in auth["mlflow"], "the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD, not git"


def test_compose_variables_are_documented():
    text = COMPOSE.read_text()
    example = (INFRA / "mlflow" / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", example, flags=re.M))
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    images = {name for name in used if name.endswith("_IMAGE")}
    missing = used - documented - images
    assert not missing, f"variables used by docker-compose.yaml but not in .env.example: {sorted(missing)}"
    required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", text))
    assert required <= documented


MLFLOW_DIR = INFRA / "mlflow"
OLD_PLACEHOLDERS = {"POSTGRES_PASSWORD": "change-me-postgres", "MINIO_ROOT_PASSWORD": "change-me-minio-at-least-8-chars",
                    "MLFLOW_AUTH_ADMIN_PASSWORD": "change-me-admin-password",
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": "change-me-to-a-long-random-string"}


def check_secrets(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MLFLOW_DIR / "check_secrets.py")], env=env, capture_output=True,
                          text=True, timeout=60)


def generated_env(tmp_path: Path) -> dict[str, str]:
    target = tmp_path / "generated.env"
    result = subprocess.run([str(MLFLOW_DIR / "setup.sh"), str(target)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert target.stat().st_mode & 0o777 == 0o600
    values = {}
    for line in target.read_text().splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values[key] = value
    return values


def test_setup_generates_every_secret_the_compose_file_requires(tmp_path):
    values = generated_env(tmp_path)
    required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", COMPOSE.read_text()))
    assert required and all(len(values[name]) == 64 for name in required), required
    assert len({values[name] for name in required}) == len(required), "every secret is its own"
    assert check_secrets({"PATH": os.environ["PATH"], **values}).returncode == 0
    again = subprocess.run([str(MLFLOW_DIR / "setup.sh"), str(tmp_path / "generated.env")], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 2 and "exists; delete it first" in again.stderr


@pytest.mark.parametrize("name,value,why", [
    *[(name, value, "looks like a placeholder ('change-me')") for name, value in OLD_PLACEHOLDERS.items()],
    ("MLFLOW_S3_SECRET_KEY", "", "not set"),
    ("POSTGRES_PASSWORD", "0123456789abcde", "15 characters; at least 16"),
    ("MINIO_ROOT_PASSWORD", "x" * 20, "looks like a placeholder"),
])
def test_compose_preflight_refuses_weak_secrets(tmp_path, name, value, why):
    env = {"PATH": os.environ["PATH"], **generated_env(tmp_path), name: value}
    result = check_secrets(env)
    assert result.returncode == 1
    assert f"environment: {name}: {why}" in result.stderr, result.stderr
    assert "run infra/mlflow/setup.sh" in result.stderr


def test_compose_runs_the_preflight_before_anything():
    services = compose()["services"]
    assert services["preflight"]["command"] == ["python", "/etc/mlflow/check_secrets.py"]
    assert "./check_secrets.py:/etc/mlflow/check_secrets.py:ro" in services["preflight"]["volumes"]
    for name in ("postgres", "minio"):
        assert services[name]["depends_on"]["preflight"]["condition"] == "service_completed_successfully"
    checked = set(services["preflight"]["environment"])
    secrets = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*(?:PASSWORD|SECRET_KEY)):", COMPOSE.read_text()))
    assert secrets == checked, f"secrets the preflight does not check: {secrets - checked}"


def test_no_secret_on_a_command_line():
    """Every secret reaches its process through the environment: no `command` or `entrypoint` names one, and the
    database URI MLflow gets carries no password (libpq reads PGPASSWORD)."""
    services = compose()["services"]
    for name, service in services.items():
        command, entrypoint = service.get("command") or [], service.get("entrypoint") or []
        for line in "\n".join([*command, *entrypoint]).splitlines():
            if re.search(r"PASSWORD|SECRET", line):
                # the one exception: piped through the shell's builtin printf into a program's stdin
                assert re.fullmatch(r"""\s*printf '%s\\n' "\$\$\{\w+\}" \| mc [\w\s-]+"\$\$\{\w+\}"\s*""", line), (
                    f"{name}: a secret on a command line: {line}")
    backend = dict(zip(mlflow_server_argv()[::2], mlflow_server_argv()[1::2]))["--backend-store-uri"]
    assert re.fullmatch(r"postgresql\+psycopg://\$\{POSTGRES_USER\}@postgres:5432/\$\{POSTGRES_DB\}", backend), backend
    environment = services["mlflow"]["environment"]
    assert environment["PGPASSWORD"] == environment["AWS_SECRET_ACCESS_KEY"].replace("MLFLOW_S3_SECRET_KEY",
                                                                                     "POSTGRES_PASSWORD")


def test_mlflow_uses_its_own_minio_user_limited_to_its_bucket():
    import json

    services = compose()["services"]
    mlflow_env = services["mlflow"]["environment"]
    assert "MINIO_ROOT" not in yaml.safe_dump(services["mlflow"]), "MLflow never sees MinIO's root keys"
    assert mlflow_env["AWS_ACCESS_KEY_ID"] == "${MLFLOW_S3_ACCESS_KEY:-mlflow-server}"
    assert mlflow_env["AWS_SECRET_ACCESS_KEY"].startswith("${MLFLOW_S3_SECRET_KEY:?")
    init = services["minio-init"]["command"][0]
    template = (MLFLOW_DIR / "minio-mlflow-policy.json").read_text()
    # minio-init fills the %s with printf, one argument each
    printf = next(line for line in init.splitlines() if line.strip().startswith("printf"))
    assert printf.count('"$${MLFLOW_BUCKET}"') == template.count("%s") == 2
    policy = json.loads(template % ("drugprot-bucket", "drugprot-bucket"))
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::drugprot-bucket", "arn:aws:s3:::drugprot-bucket/*"}
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert all(statement["Effect"] == "Allow" for statement in policy["Statement"])
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions and not any("*" in a for a in actions)
    assert 'mc admin policy attach local mlflow-artifacts --user "$${MLFLOW_S3_ACCESS_KEY}"' in init
    assert "minio-mlflow-policy.json" in yaml.safe_dump(services["minio-init"]["volumes"])


@pytest.mark.timeout(240)
def test_mlflow_server_as_composed_requires_login_and_grants_nothing_by_default(tmp_path):
    """The compose file's `mlflow server` command, run for real: PostgreSQL that requires a password, which the
    server gets only through PGPASSWORD; the basic-auth app with infra's basic_auth.ini. Anonymous requests get
    401, and a fresh user cannot read the admin's experiment (default_permission NO_PERMISSIONS)."""
    import configparser

    import requests

    from fixtures_mlflow import MLFLOW, _free_port, _stop, _wait_ready
    from fixtures_postgres import postgres_server

    password = "pg-" + os.urandom(16).hex()
    admin_password = os.urandom(16).hex()
    auth = configparser.ConfigParser()
    auth.read(MLFLOW_DIR / "basic_auth.ini")
    assert auth["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    auth["mlflow"]["database_uri"] = f"sqlite:///{tmp_path / 'basic_auth.db'}"
    with (tmp_path / "basic_auth.ini").open("w") as handle:
        auth.write(handle)

    with postgres_server("mlflow", password=password) as uri:
        host_port = uri.split("@", 1)[1].split("/", 1)[0]
        argv = [a.replace("${POSTGRES_USER}", "postgres").replace("${POSTGRES_DB}", "mlflow")
                 .replace("postgres:5432", host_port) for a in mlflow_server_argv()]
        values = dict(zip(argv[::2], argv[1::2]))
        port = _free_port()
        command = [str(MLFLOW), "server", "--app-name", values["--app-name"],
                   "--backend-store-uri", values["--backend-store-uri"],
                   "--artifacts-destination", str(tmp_path / "artifacts"),
                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        env = {**os.environ, "PGPASSWORD": password, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
               "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password, "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with (tmp_path / "server.log").open("wb") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(base, server, tmp_path / "server.log", 150)
            # the password is in no process's command line (the server and its workers)
            for pid in session_members({server.pid}):
                with contextlib.suppress(OSError):
                    assert password not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            api = f"{base}/api/2.0/mlflow"
            anonymous = requests.get(f"{api}/experiments/search", params={"max_results": 10}, timeout=10)
            assert anonymous.status_code == 401
            admin = ("admin", admin_password)
            created = requests.post(f"{api}/experiments/create", json={"name": "private"}, auth=admin, timeout=10)
            assert created.status_code == 200, created.text
            experiment = created.json()["experiment_id"]
            user = ("ray", os.urandom(16).hex())
            made = requests.post(f"{api}/users/create", json={"username": user[0], "password": user[1]}, auth=admin,
                                 timeout=10)
            assert made.status_code == 200, made.text
            denied = requests.get(f"{api}/experiments/get", params={"experiment_id": experiment}, auth=user,
                                  timeout=10)
            assert denied.status_code == 403, (denied.status_code, denied.text)
            allowed = requests.get(f"{api}/experiments/get", params={"experiment_id": experiment}, auth=admin,
                                   timeout=10)
            assert allowed.status_code == 200
        finally:
            _stop(server)


def test_pins_agree_with_constraints():
    pins = constraint_pins()
    server = dict(line.split("==", 1) for line in (INFRA / "mlflow" / "requirements.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    assert server["mlflow"] == pins["mlflow"] and server["mlflow-skinny"] == pins["mlflow-skinny"]
    assert f"drugprot-mlflow:{pins['mlflow']}" == compose()["services"]["mlflow"]["image"]
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, flags=re.M).group(1) == pins["torch"]
    assert "pip install -c constraints.txt -e ." in dockerfile
    for source in re.findall(r"^COPY (\S+) ", dockerfile, flags=re.M):
        assert source == "." or (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
    for doc in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        assert f'rayVersion: "{pins["ray"]}"' in (KUBERAY / doc).read_text()


# --- the rehearsal cluster on this machine ------------------------------------------------------------------------

TEST_PORT = 6390


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("option", ["--head-cpus", "--cpus-per-node", "--workers"])
def test_local_cluster_refuses_a_count_that_is_not_a_number(tmp_path, option):
    env = {**os.environ, "DRUGPROT_RAY_PORT": "6390", "RAY_TMPDIR": str(tmp_path)}
    result = subprocess.run([str(LOCAL_CLUSTER), "up", option, "two"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert f"up: {option} 'two' is not a non-negative integer" in result.stderr, result.stderr


def session_members(sessions: set[int]) -> set[int]:
    """Every process whose session id is one of ``sessions``."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[3]) in sessions:
                    pids.add(int(entry.name))
    return pids


def recorded_sessions(state: Path) -> set[int]:
    """The sessions local-cluster.sh recorded (one per node)."""
    return {int(line.split()[0]) for line in state.read_text().splitlines() if line.strip()}


def tcp_listeners(pids: set[int]) -> list[tuple[str, int, int]]:
    """``(address, port, pid)`` of every listening TCP socket (IPv4 and IPv6) the processes hold, from /proc."""
    import ipaddress

    owner = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        owner[int(target[8:-1])] = pid
        except OSError:
            continue
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or int(fields[9]) not in owner:   # 0A: LISTEN
                continue
            hex_address, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_address)
            # /proc writes the address as 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((str(ipaddress.ip_address(raw)), int(hex_port, 16), owner[int(fields[9])]))
    return found


def reachable_from_outside(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not ip.is_loopback


def test_listener_classification():
    assert not reachable_from_outside("127.0.0.1") and not reachable_from_outside("::1")
    assert not reachable_from_outside("::ffff:127.0.0.1")
    assert reachable_from_outside("0.0.0.0") and reachable_from_outside("::") and reachable_from_outside("10.0.0.5")
    with socket.socket() as sock:   # this process's own listener, read back from /proc
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert ("127.0.0.1", sock.getsockname()[1], os.getpid()) in tcp_listeners({os.getpid()})


@pytest.mark.parametrize("address, kept", [("127.0.0.1:6400", True), ("ray://localhost:10001", True),
                                             ("[::1]:6379", True), ("10.1.2.3:6379", False), ("head.example:6379", False)])
def test_a_loopback_cluster_address_is_joined_on_loopback(monkeypatch, address, kept):
    """Ray would rewrite 127.0.0.1 to the network address, where local-cluster.sh's nodes do not listen."""
    from drugprot.local_ray import keep_loopback_address

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    if "ray._private.ray_constants" in sys.modules:
        monkeypatch.setattr(sys.modules["ray._private.ray_constants"], "ENABLE_RAY_CLUSTER", True)
    keep_loopback_address(address)
    assert (os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0") is kept


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_cluster_up_status_down():
    """Token auth by default, every listener of every node on loopback, a driver joins with what `up` prints."""
    if port_open(TEST_PORT):
        pytest.skip(f"port {TEST_PORT} is taken by something else on this machine")
    tmpdir = tempfile.mkdtemp(prefix="dp-ray-", dir="/tmp")   # short: Ray's socket paths live under it
    env = {**os.environ, "DRUGPROT_RAY_PORT": str(TEST_PORT), "RAY_TMPDIR": tmpdir}
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(key, None)

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(LOCAL_CLUSTER), *args], env=env, capture_output=True, text=True, timeout=180)
        if check:
            assert result.returncode == 0, f"local-cluster.sh {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    try:
        up = run("up", "--workers", "1", "--cpus-per-node", "2", "--head-cpus", "0", "--memory-per-node",
                 str(2 * 1024**3), "--object-store-memory", str(500 * 1024**2), "--dashboard")
        assert "cluster up: 2 nodes alive" in up.stdout
        assert f'ray.init(address="127.0.0.1:{TEST_PORT}")' in up.stdout
        token_file = Path(tmpdir) / "auth_token"
        client = (f"export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token "
                  f"RAY_AUTH_TOKEN_PATH={token_file}")
        assert client in up.stdout, up.stdout
        assert token_file.stat().st_mode & 0o077 == 0, "the token file is readable by its owner only"

        # Nothing the cluster opened is reachable from another machine: every listener is on loopback.
        pids = session_members(recorded_sessions(Path(tmpdir) / f"drugprot-cluster-{TEST_PORT}.sessions"))
        listeners = tcp_listeners(pids)
        assert len(listeners) >= 10, listeners   # GCS, two raylets, agents, dashboard, metrics, Ray Client, ...
        exposed = [(address, port, Path(f"/proc/{pid}/comm").read_text().strip())
                   for address, port, pid in listeners if reachable_from_outside(address)]
        assert not exposed, f"listeners reachable from outside the machine: {exposed}"

        status = run("status")
        assert "nodes alive: 2" in status.stdout

        # A separate driver, set up the way the script tells a client to; without the token it is refused.
        probe = ("import ray; ray.init(address='127.0.0.1:%d', logging_level='ERROR'); "
                 "nodes = [n for n in ray.nodes() if n['Alive']]; "
                 "print(len(nodes), sum(n['Resources'].get('CPU', 0) for n in nodes), "
                 "sorted({n['NodeManagerAddress'] for n in nodes}))" % TEST_PORT)
        client_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                      "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
        driver = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                                env=client_env)
        assert driver.returncode == 0, driver.stderr[-3000:]
        # the worker's 2 CPUs (the head has none), both nodes on 127.0.0.1
        assert driver.stdout.splitlines()[-1] == "2 2.0 ['127.0.0.1']", driver.stdout
        wrong_token = Path(tmpdir) / "wrong_token"
        wrong_token.write_text("0" * 64)
        wrong = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                               env={**client_env, "RAY_AUTH_TOKEN_PATH": str(wrong_token)})
        assert wrong.returncode != 0 and "token" in wrong.stderr.lower(), wrong.stderr[-2000:]
    finally:
        down = run("down", check=False)
        shutil.rmtree(tmpdir, ignore_errors=True)
    assert down.returncode == 0, f"down failed:\n{down.stdout}\n{down.stderr}"
    assert "stopped (2 node(s))" in down.stdout
    assert not port_open(TEST_PORT), "the head still answers after down"
