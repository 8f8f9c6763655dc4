"""Serving options: the one typed set of arguments behind ``drugprot serve``, ``serve/*.yaml`` and the builder.

``build_app(args)`` validates a plain dict against :class:`ServeOptions` (unknown keys are refused, each problem is
reported as ``serve args: KEY: what was wrong, got VALUE``). This module imports neither Ray nor torch.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drugprot.errors import DrugprotError
from drugprot.inference.options import InferenceOptions, option_errors


class Limits(BaseModel):
    """Per-request limits; a request over any of them is refused with 413 before it reaches the model."""

    model_config = ConfigDict(extra="forbid")

    max_documents: int = Field(64, ge=1, le=10_000, description="Documents in one request.")
    max_characters: int = Field(200_000, ge=1, le=50_000_000, description="Characters of text, summed over documents.")
    max_entities: int = Field(5_000, ge=1, le=1_000_000, description="Entities, summed over documents.")
    max_pairs: int = Field(4_096, ge=1, le=1_000_000, description="Candidate CHEMICAL-GENE pairs, summed over documents.")
    max_body_bytes: int = Field(2_000_000, ge=1_024, le=512_000_000, description="Size of the request body in bytes.")
    body_timeout_s: float = Field(10.0, gt=0, le=600, description="Time to receive a whole request body (408 after).")
    body_idle_timeout_s: float = Field(2.0, gt=0, le=600, description="Longest pause between two parts of a body "
                                       "(408 after).")
    max_unfinished_bodies: int = Field(32, ge=1, le=100_000, description="Bodies an ingress replica receives at once; "
                                       "more get 503 at once, so stalled uploads cannot occupy the replica.")
    max_unfinished_bodies_per_client: int = Field(8, ge=1, le=100_000, description="The same, per client address "
                                                  "(429 beyond it).")


class ProxyLimits(BaseModel):
    """What one client may hold at Serve's HTTP proxy before any request reaches the application: nginx's defaults
    for header size and time, and a cap on connections per client address. The proxy reads them from the
    environment variable ``PROXY_LIMITS_ENV`` (JSON; ``drugprot serve`` sets it from its flags)."""

    model_config = ConfigDict(extra="forbid")

    max_header_line_bytes: int = Field(8_192, ge=256, le=1_048_576, description="Request line or one header line "
                                       "(431 beyond it, then the connection is closed).")
    max_header_bytes: int = Field(32_768, ge=1_024, le=16_777_216, description="Request line and headers together "
                                  "(431 beyond it, then the connection is closed).")
    header_timeout_s: float = Field(10.0, gt=0, le=600, description="Time to receive a request's line and headers "
                                    "(408 after it, then the connection is closed).")
    max_connections_per_client: int = Field(512, ge=1, le=1_000_000, description="Open connections from one client "
                                            "address at this proxy; one more is answered 429 and closed.")


PROXY_LIMITS_ENV = "DRUGPROT_PROXY_LIMITS"


DEFAULT_QUEUE_WAIT_S = 2.0


class Rollout(BaseModel):
    """A challenger beside the champion (``model``): a canary share of the traffic, or a shadow of every request.

    The challenger runs as its own Serve application (``NAME-challenger``, no route), so a challenger that fails to
    load leaves the champion's application serving. Canary and shadow exclude each other: a canary request is answered
    by the challenger, a shadowed one by the champion alone."""

    model_config = ConfigDict(extra="forbid")

    challenger: str = Field(..., min_length=1, description="The challenger: model folder, ensemble folder, or "
                            "registry URI models:/NAME@ALIAS (e.g. models:/drugprot@challenger).")
    canary_percent: int = Field(0, ge=0, le=100, description="Share of requests (0-100 %) the challenger answers; "
                                "a request's X-Request-Key header picks its side deterministically (the key's "
                                "SHA-256 modulo 100 below the share: challenger), a request without one is drawn "
                                "at random.")
    shadow: bool = Field(False, description="Send every request to the challenger too, in the background, and answer "
                         "from the champion alone; count per relation type how often the challenger agrees.")
    shadow_timeout_s: float = Field(5.0, gt=0, le=600, description="With shadow: a challenger call not answered by "
                                    "then is abandoned and counted as timed out.")
    shadow_max_in_flight: int = Field(64, ge=1, le=100_000, description="With shadow: challenger calls one ingress "
                                      "replica has open at once; a request beyond them is not shadowed (counted as "
                                      "skipped), so a slow challenger cannot pile up work.")

    @model_validator(mode="after")
    def _one_mode(self) -> Rollout:
        if self.shadow and self.canary_percent:
            raise ValueError(f"canary_percent and shadow exclude each other (a canary request is answered by the "
                             f"challenger, a shadowed one by the champion alone): give canary_percent "
                             f"{self.canary_percent} or shadow, not both")
        return self

    @property
    def mode(self) -> str:
        return "shadow" if self.shadow else "canary"


class ServeOptions(InferenceOptions):
    """Everything one application needs: how to run the model (the :class:`InferenceOptions` fields, flat in the
    YAML, checked by the same rules), replicas, resources, batching, limits, auth and warm-up."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, description="Model folder, ensemble folder, or registry URI models:/NAME@ALIAS.")
    tracking_uri: str | None = Field(None, description="MLflow tracking/registry URI for models:/ URIs "
                                                       "(default: MLFLOW_TRACKING_URI in the replica's environment).")
    verify_key: str | None = Field(None, min_length=1, description="Path of an ed25519 public key (PEM) readable by "
                                   "every replica: a model whose manifest that key did not sign is refused.")
    replicas: int | None = Field(None, ge=1, le=1_000, description="Fixed number of replicas (default 1).")
    autoscale: str | None = Field(None, description="'MIN:MAX' replicas for Serve autoscaling; excludes 'replicas'.")
    num_cpus: float = Field(1.0, gt=0, le=256, description="CPUs per replica; torch uses floor(num_cpus) threads (at least 1).")
    gpus_per_replica: float = Field(0.0, ge=0, le=16, description="GPUs per replica; > 0 runs on CUDA in bf16, else CPU fp32.")
    max_batch_pairs: int = Field(64, ge=1, le=65_536, description="Candidate pairs combined from concurrent requests into "
                                                                  "one model call; 1 disables cross-request batching. A "
                                                                  "larger request is cut into chunks of this many pairs "
                                                                  "that take turns with other requests.")
    batch_wait_ms: float = Field(5.0, ge=0, le=10_000, description="How long the first request of a batch waits for company.")
    max_ongoing_requests: int | None = Field(None, ge=1, le=100_000, description="Requests a replica works on at once "
                                             "(default: max_batch_pairs, so even one-pair requests can fill a batch).")
    max_queued_requests: int = Field(64, ge=-1, le=1_000_000, description="Requests waiting at the proxy beyond the "
                                     "replicas' capacity; more are refused with 503 at once (-1: unbounded).")
    max_queue_wait_s: float | None = Field(DEFAULT_QUEUE_WAIT_S, gt=0, le=3_600, description="Latency objective for "
                                           "admission: a request whose expected wait in the model replica's queue "
                                           "(pairs ahead at the recent pairs/s) exceeds it is refused at once with "
                                           "503 and Retry-After, and one that has waited that long is refused rather "
                                           "than run late (default 2 s; 0 or null: none, only the queue bounds "
                                           "refuse).")
    target_ongoing_requests: float | None = Field(None, gt=0, le=100_000, description="With autoscale: requests per "
                                                  "replica Serve aims for (default: max(2, max_batch_pairs / 8)).")
    ingress_replicas: int = Field(1, ge=1, le=1_000, description="Replicas of the ingress deployment (HTTP, validation, "
                                  "candidates); they scale apart from the model's.")
    ingress_cpus: float = Field(0.25, gt=0, le=256, description="CPUs per ingress replica.")
    retry_attempts: int = Field(3, ge=1, le=100, description="Model calls per job when a model replica dies mid-call "
                                "(scoring is pure, so a retry on another replica is safe).")
    retry_deadline_s: float = Field(60.0, gt=0, le=3_600, description="A job's model calls, retries included, end by "
                                    "then; afterwards the request gets 503.")
    limits: Limits = Field(default_factory=Limits)
    token_env: str | None = Field("DRUGPROT_API_TOKEN", description="Environment variable (read in each replica) holding "
                                  "the bearer token; unset or empty variable = no authentication; null = never.")
    require_token: bool = Field(False, description="Refuse to start when token_env is not set in the replica.")
    api_docs: bool = Field(False, description="Serve the interactive API docs at /docs and /redoc (they load Swagger "
                           "UI and ReDoc from a CDN; /openapi.json is served either way).")
    warmup_rounds: int = Field(2, ge=0, le=100_000, description="Synthetic batches run before /readyz turns ready.")
    follow_alias: bool = Field(False, description="Watch the registry alias of model (models:/NAME@ALIAS) and roll the "
                               "model deployment onto each version it moves to (drugprot serve).")
    poll_s: float = Field(30.0, gt=0, le=86_400, description="With follow_alias: seconds between two reads of the alias.")
    rollout: Rollout | None = Field(None, description="A challenger served beside the model: canary or shadow.")

    @field_validator("autoscale")
    @classmethod
    def _autoscale_form(cls, value: str | None) -> str | None:
        if value is None:
            return value
        low, high = parse_autoscale(value)
        return f"{low}:{high}"

    @field_validator("max_queue_wait_s", mode="before")
    @classmethod
    def _objective_off(cls, value: Any) -> Any:
        return None if value == 0 else value

    @model_validator(mode="after")
    def _replicas_or_autoscale(self) -> ServeOptions:
        if self.replicas is not None and self.autoscale is not None:
            raise ValueError("give either replicas or autoscale, not both")
        if self.device_problem(self.device):
            raise ValueError(f"{{precision}} {self.precision} runs on CPU replicas only; set gpus_per_replica to 0 or "
                             f"precision to bf16")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests: must be -1 (unbounded) or at least 1, got 0")
        if self.follow_alias and registry_alias(self.model) is None:
            raise ValueError(f"follow_alias needs a registry alias to watch: model must be models:/NAME@ALIAS "
                             f"(e.g. models:/drugprot@champion), got {self.model!r}")
        if self.follow_alias and self.rollout is not None:
            raise ValueError("follow_alias and rollout exclude each other: a rollout shows the challenger to part of "
                             "the traffic first, following the alias moves all of it at once; give one")
        return self

    def without_rollout(self, **changes: Any) -> ServeOptions:
        """These options for a model deployment (champion or challenger): the rollout belongs to the ingress alone,
        so changing it leaves the model replicas running."""
        return self.model_copy(update={"rollout": None, **changes})

    @property
    def ongoing_requests(self) -> int:
        return self.max_ongoing_requests or self.max_batch_pairs

    @property
    def torch_threads(self) -> int:
        return max(1, math.floor(self.num_cpus))

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_replica > 0 else "cpu"

    @property
    def inference(self) -> InferenceOptions:
        """How the model replicas run the model: these options' inference fields alone."""
        return InferenceOptions(**{name: getattr(self, name) for name in InferenceOptions.model_fields})

    @property
    def max_model_replicas(self) -> int:
        """The most model replicas there can be: the fixed count, or autoscaling's maximum."""
        return parse_autoscale(self.autoscale)[1] if self.autoscale is not None else self.replicas or 1

    def ingress_deployment_options(self) -> dict[str, Any]:
        """``Deployment.options`` of the ingress: it only waits on the model, so each ingress replica admits every
        request the model deployment may hold for it at its largest (in progress on autoscaling's most replicas,
        plus those queued at the caller: Serve bounds ``max_queued_requests`` per caller), and the proxy queues four
        times as many (a burst beyond them, or while ingress replicas start). Refusals therefore come from the model
        (its queue bound and the latency objective) and the proxy's admission, as JSON 503s with ``Retry-After``,
        not from the proxy's queue (plain text, none)."""
        ongoing = max(64, self.max_model_replicas * self.ongoing_requests + max(self.max_queued_requests, 0))
        return {
            "num_replicas": self.ingress_replicas,
            "ray_actor_options": {"num_cpus": self.ingress_cpus},
            "max_ongoing_requests": ongoing,
            "max_queued_requests": -1 if self.max_queued_requests == -1 else 4 * ongoing,
            "health_check_period_s": 5.0,
            "graceful_shutdown_timeout_s": 20.0,
            "max_constructor_retry_count": 3,
            "max_surge_percent": 100,  # a redeploy (champion swap) starts new replicas before stopping old ones
        }

    def deployment_options(self) -> dict[str, Any]:
        """``Deployment.options`` of the model: replicas or autoscaling, resources, admission limits."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.gpus_per_replica},
            "max_ongoing_requests": self.ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": 5.0,
            "graceful_shutdown_timeout_s": 20.0,
            "max_constructor_retry_count": 3,
            "max_surge_percent": 100,  # a redeploy (champion swap) starts new replicas before stopping old ones
        }
        if self.autoscale is not None:
            low, high = parse_autoscale(self.autoscale)
            options["num_replicas"] = "auto"
            options["autoscaling_config"] = {
                "min_replicas": low,
                "initial_replicas": max(low, 1),
                "max_replicas": high,
                # a dozen-pair document per request: about two batches' worth of requests per replica
                "target_ongoing_requests": self.target_ongoing_requests or max(2, self.max_batch_pairs // 8),
            }
        else:
            options["num_replicas"] = self.replicas or 1
        return options


def registry_alias(model: str) -> str | None:
    """The alias of a ``models:/NAME@ALIAS`` URI; None for a folder or ``models:/NAME/VERSION``."""
    from drugprot.registry import RegistryError, parse_model_uri

    try:
        return parse_model_uri(model)[1] if model.startswith("models:/") else None
    except RegistryError:
        return None


def parse_autoscale(value: str) -> tuple[int, int]:
    """'MIN:MAX' → (MIN, MAX) with 0 <= MIN <= MAX and MAX >= 1."""
    parts = str(value).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        low, high = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"autoscale must look like MIN:MAX (e.g. 1:4), got {value!r}") from None
    if not 0 <= low <= high or high < 1:
        raise ValueError(f"autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {value!r}")
    return low, high


def parse_options(args: dict[str, Any] | ServeOptions | None, *, source: str = "serve args") -> ServeOptions:
    """Validate builder arguments; one line per problem, naming the key and the value found."""
    if isinstance(args, ServeOptions):
        return args
    return parse_model(ServeOptions, args, source=source)


def parse_model(model: type[BaseModel], args: dict[str, Any] | None, *, source: str) -> Any:
    """``model`` validated from ``args``, or a ``DrugprotError`` with one line per problem."""
    try:
        return model.model_validate(dict(args or {}))
    except ValidationError as error:
        raise DrugprotError("\n".join(f"{source}: {line}" for line in option_errors(error, "key"))) from None
