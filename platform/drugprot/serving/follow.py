"""Live champion swap: ``drugprot serve --model models:/NAME@ALIAS --follow-alias`` keeps serving whatever the
alias names.

Every replica of the model deployment is pinned to one registry version (``build_application(version=...)``), so a
replica that Serve replaces later loads the version its siblings serve, not whatever the alias names by then.
Every ``poll_s`` the driver reads the alias; when it names another version, :class:`AliasFollower` redeploys the
application pinned to that version. Serve rolls the replicas start-before-stop (``max_surge_percent``): a new model
replica loads and warms up in its constructor beside the old one, Serve routes to it once it is running, and then
stops the old one gracefully (it finishes what it holds). A new version that fails to load or warm up fails its
constructor (tried once); Serve keeps the old replicas serving, the follower tells them the error, which
``/v1/model`` then shows as ``swap_error``, and redeploys the old version carrying it. A version that failed is not
tried again until the alias names another.
"""

from __future__ import annotations

import logging
import math
import threading

from ray import serve
from ray.serve.schema import ApplicationStatus

from drugprot.errors import DrugprotError
from drugprot.polling import poll
from drugprot.serving.app import MODEL_DEPLOYMENT, build_application, deployment_failure
from drugprot.serving.options import ServeOptions

log = logging.getLogger("drugprot.serving")

SETTLED = (ApplicationStatus.RUNNING, ApplicationStatus.DEPLOY_FAILED)


class AliasFollower:
    """Deploys ``options.model`` (``models:/NAME@ALIAS``) pinned to the version the alias names, and follows it."""

    def __init__(self, options: ServeOptions, *, app_name: str, route_prefix: str, timeout_s: float,
                 say=log.warning):
        """``timeout_s``: how long one swap may take (load and warm-up of the new version) before it counts as
        failed; ``say`` gets one line per event (the CLI prints them)."""
        if not options.follow_alias:
            raise DrugprotError("AliasFollower needs options with follow_alias set")
        self.options = options
        self.app_name = app_name
        self.route_prefix = route_prefix
        self.timeout_s = timeout_s
        self.say = say
        self.version: str | None = None  # the version being served
        self.swap_error: str | None = None
        self.failed: set[str] = set()
        self._stop = threading.Event()

    def named_version(self) -> str:
        """The version the alias names now (a ``RegistryError`` says why there is none)."""
        from drugprot.registry import resolve_model_version

        return str(resolve_model_version(self.options.model, tracking_uri=self.options.tracking_uri).version)

    def deploy(self) -> None:
        """The first deployment: the version the alias names now, blocking like ``serve.run`` (whose
        ``RuntimeError`` says why the application failed)."""
        self.version = self.named_version()
        serve.run(build_application(self.options, version=self.version), name=self.app_name,
                  route_prefix=self.route_prefix)

    def follow(self, stop: threading.Event) -> None:
        """Read the alias every ``poll_s`` and swap to each new version it names, until ``stop`` is set."""
        self._stop = stop
        poll(self._check, timeout=math.inf, interval=self.options.poll_s, stop=stop)

    def _check(self) -> None:
        """One look at the alias; always None, so that ``poll`` goes on until stopped."""
        try:
            named = self.named_version()
            if named != self.version and named not in self.failed:
                self.swap(named)
        except DrugprotError as error:
            self.say(f"drugprot serve: cannot read {self.options.model} ({error}); version {self.version} goes on "
                     f"serving")
        except Exception as error:  # noqa: BLE001 - Serve or Ray failing mid-swap: say so, keep following
            if not self._stop.is_set():  # at shutdown Serve goes away under a swap: nothing to report
                self.say(f"drugprot serve: following {self.options.model} failed ({type(error).__name__}: {error}); "
                         f"trying again in {self.options.poll_s:g} s")
        return None

    def swap(self, version: str) -> bool:
        """Roll the model deployment onto ``version``; True once it serves, False when the old version stays."""
        old = self.version
        self.say(f"drugprot serve: {self.options.model} moved from version {old} to {version}: loading it beside "
                 f"version {old}")
        # one try: while the new version fails, the old one serves; a second look at the same files changes nothing
        error = self._roll(version, None, constructor_tries=1)
        if error is None:
            self.version, self.swap_error = version, None
            self.say(f"drugprot serve: version {version} serves {self.options.model} now; version {old} drains")
            return True
        if self._stop.is_set():
            return False
        self.failed.add(version)
        self.swap_error = f"version {version}: {error}"
        self.say(f"drugprot serve: version {version} of {self.options.model} could not be served ({error}); "
                 f"version {old} goes on serving")
        # Serve kept the old replicas: they show the error at once; then deploy the old version again (replicas that
        # Serve starts later load it, not the failed one), carrying the error
        try:
            serve.get_deployment_handle(MODEL_DEPLOYMENT, self.app_name).broadcast("note_swap_error",
                                                                                   self.swap_error).results()
        except Exception as failure:  # noqa: BLE001 - the redeploy below carries the error anyway
            self.say(f"drugprot serve: could not tell the serving replicas ({type(failure).__name__}: {failure})")
        again = self._roll(old, self.swap_error)
        if again is None:
            self.say(f"drugprot serve: version {old} redeployed after the failed swap")
        elif not self._stop.is_set():
            self.say(f"drugprot serve: redeploying version {old} after the failed swap failed too: {again}")
        return False

    def _roll(self, version: str, swap_error: str | None, constructor_tries: int | None = None) -> str | None:
        """Redeploy pinned to ``version`` and wait until Serve runs it: None, or why it does not."""
        application = build_application(self.options, version=version, swap_error=swap_error,
                                        constructor_tries=constructor_tries)
        serve.run_many([serve.RunTarget(application, name=self.app_name, route_prefix=self.route_prefix)],
                       wait_for_applications_running=False)
        status = poll(self._settled, timeout=self.timeout_s, interval=1.0, stop=self._stop)
        if status == ApplicationStatus.RUNNING:
            return None
        if self._stop.is_set():
            return "drugprot serve was stopped during the swap"
        if status is None:
            return (f"not running after {self.timeout_s:.0f} s (is there room for one more model replica beside the "
                    f"old ones?)")
        return deployment_failure(self.app_name) or "Serve could not deploy it"

    def _settled(self) -> ApplicationStatus | None:
        application = serve.status().applications.get(self.app_name)
        return application.status if application is not None and application.status in SETTLED else None
