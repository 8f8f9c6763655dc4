"""``drugprot serve``: run the relation-extraction HTTP application on Ray Serve until SIGTERM or SIGINT.

Without ``--address`` a private single-node Ray is started (and stopped on exit; its logs are kept in the run
folder); with ``--address`` the app is deployed onto that cluster and deleted again on exit (Serve and the cluster
keep running). Auth is on unless ``--no-auth`` (loopback only): the token comes from ``DRUGPROT_API_TOKEN``, or is
made here and written to a file only the user can read.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

TOKEN_ENV = "DRUGPROT_API_TOKEN"
METRICS_PORT = 8080  # Ray's and KubeRay's metrics port: infra/prometheus/scrape.yaml scrapes 127.0.0.1:8080
DASHBOARD_PORT = 8265  # Ray's dashboard port, where `serve status` asks by default


def register(commands) -> None:
    from drugprot.inference.options import add_inference_arguments

    parser = commands.add_parser("serve", help="Serve the model over HTTP (Ray Serve) until SIGTERM/SIGINT.",
                                 description="Serve POST /v1/relations, GET /v1/model, /healthz and /readyz on Ray "
                                             "Serve. Clients send 'Authorization: Bearer TOKEN': the token is "
                                             f"{TOKEN_ENV} when set, else a new one written to RUN_DIR/api-token "
                                             "(readable by the user only); --no-auth turns auth off on loopback.")
    parser.add_argument("--model", required=True, help="model folder, ensemble folder, or models:/NAME@ALIAS")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, help="fixed number of model replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="Serve autoscaling between MIN and MAX model replicas")
    parser.add_argument("--ingress-replicas", type=int, help="HTTP ingress replicas (default 1), apart from the model's")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per model replica (> 0: CUDA, bf16)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per model replica (torch threads)")
    add_inference_arguments(parser)
    parser.add_argument("--max-batch-pairs", type=int, default=64,
                        help="candidate pairs from concurrent requests per model call (1 = no batching); a larger "
                             "request is cut into chunks of this size that take turns with other requests")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill")
    parser.add_argument("--max-queued-requests", type=int, default=64, help="requests queued beyond capacity before 503")
    parser.add_argument("--max-queue-wait-s", type=float,
                        help="latency objective: refuse (503, Retry-After) a request expected to wait longer than "
                             "this in the model's queue, and one that has (default 2; 0: no objective)")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI for models:/ URIs")
    parser.add_argument("--verify-key", metavar="PEM", help="ed25519 public key: refuse a model whose manifest is not "
                                                            "signed by it (drugprot ensemble --sign-key)")
    parser.add_argument("--address", help="existing Ray cluster (e.g. ray://HEAD:10001 or HEAD:6379); "
                                          "default: start a private local Ray")
    parser.add_argument("--metrics-port", type=int, help=f"the local Ray's Prometheus metrics port, on 127.0.0.1 "
                        f"(default {METRICS_PORT}); a cluster (--address) sets its own with ray start "
                        f"--metrics-export-port")
    parser.add_argument("--dashboard-port", type=int, help=f"the local Ray's dashboard port, on 127.0.0.1, which "
                        f"`serve status` reads (default {DASHBOARD_PORT})")
    parser.add_argument("--name", default="drugprot", help="Serve application name")
    parser.add_argument("--route-prefix", default="/", help="HTTP route prefix of the application")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--require-token", action="store_true",
                      help=f"refuse to start without {TOKEN_ENV} (instead of making a token)")
    auth.add_argument("--no-auth", action="store_true", help="no bearer token (refused with any --host beyond loopback)")
    parser.add_argument("--api-docs", action="store_true", help="serve /docs and /redoc (they load Swagger UI and "
                        "ReDoc from a CDN)")
    parser.add_argument("--max-connections-per-client", type=int, help="open connections from one client address at "
                        "the HTTP proxy (default 512; more get 429)")
    parser.add_argument("--run-dir", type=Path, help="folder for the token file and Ray's logs (default "
                        "runs/serve/UTC-TIMESTAMP)")
    parser.add_argument("--delete-logs", action="store_true", help="delete Ray's logs on a clean stop instead of "
                        "keeping them in the run folder")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the model to load")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds to let accepted requests finish (new ones get 503)")
    parser.add_argument("--follow-alias", action="store_true",
                        help="with --model models:/NAME@ALIAS: serve each version the alias moves to, loaded and warmed "
                             "up beside the old one before traffic moves (a version that fails leaves the old one "
                             "serving, and GET /v1/model says why)")
    parser.add_argument("--poll-s", type=float, help="with --follow-alias: seconds between reads of the alias (default 30)")
    rollout = parser.add_argument_group("rollout", "a challenger beside the champion (--model), in its own Serve "
                                        "application: one that fails to load leaves the champion serving")
    rollout.add_argument("--challenger", help="model folder, ensemble folder, or models:/NAME@ALIAS (e.g. "
                                              "models:/drugprot@challenger)")
    rollout.add_argument("--canary-percent", type=int, help="share of requests (0-100) the challenger answers; the "
                                                            "X-Request-Key header picks a request's side for good")
    rollout.add_argument("--shadow", action="store_true", help="send every request to the challenger too, answer "
                                                               "from the champion alone, count agreement per type")
    rollout.add_argument("--shadow-timeout-s", type=float, help="with --shadow: abandon a challenger call after this "
                                                                "many seconds (default 5)")
    parser.set_defaults(handler=_serve, usage_error=parser.error)


def serve_options(args) -> dict:
    from drugprot.inference.options import given_arguments

    options = {
        **given_arguments(args),
        "model": args.model,
        "tracking_uri": args.tracking_uri,
        "verify_key": args.verify_key,
        "replicas": args.replicas,
        "autoscale": args.autoscale,
        "ingress_replicas": args.ingress_replicas,
        "num_cpus": args.cpus_per_replica,
        "gpus_per_replica": args.gpus_per_replica,
        "max_batch_pairs": args.max_batch_pairs,
        "batch_wait_ms": args.batch_wait_ms,
        "max_queued_requests": args.max_queued_requests,
        "max_queue_wait_s": args.max_queue_wait_s,
        "require_token": args.require_token or None,
        "api_docs": args.api_docs or None,
        "follow_alias": args.follow_alias,
        "poll_s": args.poll_s,
    }
    options = {key: value for key, value in options.items() if value is not None}
    rollout = {"challenger": args.challenger, "canary_percent": args.canary_percent, "shadow": args.shadow or None,
               "shadow_timeout_s": args.shadow_timeout_s}
    rollout = {key: value for key, value in rollout.items() if value is not None}
    if rollout and args.challenger is None:
        flag = next(f"--{key.replace('_', '-')}" for key in rollout)
        args.usage_error(f"{flag}: needs --challenger (the model that gets the canary share or the shadow calls)")
    if rollout:
        options["rollout"] = rollout
    if args.no_auth:
        options["token_env"] = None
    elif args.address is not None:  # the cluster's replicas must hold the token: they are not started from here
        options["require_token"] = True
    return options


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def provide_token(run_dir: Path) -> Path | None:
    """Make sure the replicas (children of the Ray started here) find a token in ``TOKEN_ENV``: the one already set,
    else a new one, written to ``run_dir/api-token`` with mode 0600 first; returns that file (None: the variable
    was set)."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return None
    token = secrets.token_urlsafe(32)
    path = run_dir / "api-token"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    os.environ[TOKEN_ENV] = token
    return path


def local_ports(args) -> dict[str, int]:
    """The local Ray's metrics and dashboard ports, checked free on 127.0.0.1 before Ray starts (Ray would fail
    later with its own message); with ``--address`` neither option applies."""
    from drugprot.errors import DrugprotError
    from drugprot.local_ray import LOOPBACK

    chosen = {"--metrics-port": args.metrics_port, "--dashboard-port": args.dashboard_port}
    if args.address is not None:
        given = [flag for flag, port in chosen.items() if port is not None]
        if given:
            args.usage_error(f"{given[0]}: applies to the local Ray only; a cluster (--address) sets its own ports "
                             f"with ray start --metrics-export-port / --dashboard-port")
        return {}
    ports = {"--metrics-port": args.metrics_port or METRICS_PORT, "--dashboard-port": args.dashboard_port or DASHBOARD_PORT}
    for flag, port in ports.items():
        if not 1 <= port <= 65535:
            args.usage_error(f"{flag}: must be a TCP port (1-65535), got {port}")
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Ray's servers bind
            try:
                probe.bind((LOOPBACK, port))
            except OSError as error:
                raise DrugprotError(f"{flag} {port}: 127.0.0.1:{port} is not free ({error.strerror}); choose "
                                    f"another with {flag}") from None
    if ports["--metrics-port"] == ports["--dashboard-port"]:
        args.usage_error(f"--metrics-port and --dashboard-port: both are {ports['--metrics-port']}; give two ports")
    return ports


def serve_status_command(dashboard_port: int) -> str:
    """The shell line that runs Ray's ``serve status`` against the local Ray: the CLI sends Ray's auth token only
    when ``RAY_AUTH_MODE=token`` is set in its own environment, and reads it from ``RAY_AUTH_TOKEN_PATH``."""
    auth = ""
    if os.environ.get("RAY_AUTH_MODE") == "token":
        path = os.environ.get("RAY_AUTH_TOKEN_PATH")
        auth = "RAY_AUTH_MODE=token " + (f"RAY_AUTH_TOKEN_PATH={shlex.quote(path)} " if path else "")
    return f"{auth}serve status --address http://127.0.0.1:{dashboard_port}"


def keep_logs(ray_folder: Path, run_dir: Path) -> Path | None:
    """Copy the Ray session's logs into ``run_dir/ray-logs``; returns that folder (None: no logs were found)."""
    logs = next((found / "logs" for found in ray_folder.glob("*/session_latest") if (found / "logs").is_dir()), None)
    if logs is None:  # Ray keeps its sessions in RAY_TMPDIR/ray/
        return None
    kept = run_dir / "ray-logs"
    shutil.copytree(logs, kept, symlinks=True, dirs_exist_ok=True, ignore_dangling_symlinks=True)
    return kept


def _serve(args) -> int:
    from drugprot.errors import DrugprotError
    from drugprot.serving.options import PROXY_LIMITS_ENV, ProxyLimits, parse_model, parse_options

    try:
        options = parse_options(serve_options(args), source="option")
    except DrugprotError as error:  # a flag's value or a combination of flags: a usage error, as argparse's own
        args.usage_error(str(error).replace("\n", "; "))
    if args.address is None and not options.model.startswith("models:/") and not Path(options.model).exists():
        raise DrugprotError(f"--model {options.model}: no such folder (train one with `drugprot train`, or give "
                            f"models:/NAME@ALIAS)")
    if options.verify_key is not None and not options.model.startswith("models:/") and Path(options.model).exists():
        from drugprot.manifest import verify_signature

        verify_signature(options.model, options.verify_key)  # before Ray starts; each replica checks again
    if options.early_exit is not None and not options.model.startswith("models:/") and Path(options.model).exists():
        from drugprot.inference.loading import early_exit_for

        early_exit_for(options.model, options.early_exit)  # the replicas would only say it in their logs
    if args.no_auth and not is_loopback(args.host):
        args.usage_error(f"--no-auth: refused with --host {args.host}, which is reachable beyond this machine; serve "
                         f"with a token (the default) or bind 127.0.0.1")
    if args.require_token and args.address is None and not os.environ.get(TOKEN_ENV, "").strip():
        raise DrugprotError(f"--require-token: {TOKEN_ENV} is empty or unset; set it, or leave out --require-token "
                            f"to have a token made")
    proxy_limits = json.loads(os.environ.get(PROXY_LIMITS_ENV) or "{}")
    if args.max_connections_per_client is not None:
        proxy_limits["max_connections_per_client"] = args.max_connections_per_client
    proxy_limits = parse_model(ProxyLimits, proxy_limits, source="option")
    challenger = options.rollout.challenger if options.rollout is not None else None
    if challenger is not None and args.address is None and not challenger.startswith("models:/") \
            and not Path(challenger).exists():
        raise DrugprotError(f"--challenger {challenger}: no such folder")
    for uri in (options.model, challenger):
        if uri is not None and uri.startswith("models:/") and (args.address is None or options.tracking_uri):
            from drugprot.registry import resolve_model_version

            resolve_model_version(uri, tracking_uri=options.tracking_uri)  # a bad alias now, not after Ray
    ports = local_ports(args)
    run_dir = args.run_dir or Path("runs") / "serve" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    stop = threading.Event()
    import ray
    from ray import serve

    from drugprot.local_ray import keep_loopback_address, start_local_ray
    from drugprot.serving import build_app, build_challenger
    from drugprot.serving.app import challenger_app_name, deployment_failure, drain_application
    from drugprot.serving.follow import AliasFollower

    local, folder, clean, chosen = args.address is None, None, False, None
    if local:
        from drugprot.serving.proxy import PROXY_CALLBACK

        if not args.no_auth:
            token_file = provide_token(run_dir)
            _say(f"drugprot serve: bearer token written to {token_file} (readable by you only); send "
                 f"'Authorization: Bearer <its content>'" if token_file else
                 f"drugprot serve: bearer token from {TOKEN_ENV}")
        chosen = os.environ.get("RAY_TMPDIR")
        # the proxy inherits both: header and connection bounds, token on /-/routes, admission, lost requests resent
        os.environ.setdefault(*PROXY_CALLBACK)
        os.environ[PROXY_LIMITS_ENV] = proxy_limits.model_dump_json()
        folder = start_local_ray(dashboard=True, dashboard_port=ports["--dashboard-port"],
                                 _metrics_export_port=ports["--metrics-port"])
        print(f"drugprot serve: started a local Ray (temporary folder {folder})", file=sys.stderr, flush=True)
        _say(f"drugprot serve: Prometheus metrics: http://127.0.0.1:{ports['--metrics-port']}/metrics")
        _say(f"drugprot serve: Serve status: {serve_status_command(ports['--dashboard-port'])}")
    else:
        keep_loopback_address(args.address)
        ray.init(address=args.address, log_to_driver=False)
    # Ray installs its own SIGTERM handler in ray.init; ours replaces it so both signals stop cleanly.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    deployed = False
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        follower = AliasFollower(options, app_name=args.name, route_prefix=args.route_prefix,
                                 timeout_s=args.ready_timeout, say=_say) if options.follow_alias else None
        try:
            if follower is not None:
                follower.deploy()
            else:
                if challenger is not None:  # its own application: its failure cannot fail the champion's
                    serve.run_many([serve.RunTarget(build_challenger(options), name=challenger_app_name(args.name),
                                                    route_prefix=None)], wait_for_applications_running=False)
                serve.run(build_app(options), name=args.name, route_prefix=args.route_prefix)
        except RuntimeError as error:
            raise DrugprotError(f"the model could not be served: {deployment_failure(args.name) or error}") from None
        deployed = True
        base = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}{args.route_prefix.rstrip('/')}"
        if not _wait_ready(f"{base}/readyz", args.ready_timeout, stop):
            if stop.is_set():
                clean = True
                return 0
            raise DrugprotError(f"the application did not become ready within {args.ready_timeout:.0f} s "
                                f"(GET {base}/readyz); see the replica logs under the Ray session folder")
        print(f"drugprot serve: ready at {base}/v1/relations (model {options.model}); "
              f"SIGTERM or Ctrl-C stops it", file=sys.stderr, flush=True)
        if follower is not None:
            _say(f"drugprot serve: serving version {follower.version}; following {options.model} every "
                 f"{options.poll_s:g} s")
            threading.Thread(target=follower.follow, args=(stop,), daemon=True, name="drugprot-follow").start()
        if challenger is not None:
            _say(rollout_status(options, challenger_app_name(args.name), args.ready_timeout, stop))
        while not stop.wait(1.0):
            pass
        print("drugprot serve: stopping: new requests get 503, accepted ones finish", file=sys.stderr, flush=True)
        left = drain_application(args.name, timeout_s=args.drain_timeout)
        if left:
            print(f"drugprot serve: {left} request(s) still running after {args.drain_timeout:.0f} s; stopping anyway",
                  file=sys.stderr, flush=True)
        clean = True
        return 0
    finally:
        try:
            if local:
                serve.shutdown()
            elif deployed:
                serve.delete(args.name)
                if challenger is not None:
                    serve.delete(challenger_app_name(args.name))
        finally:
            ray.shutdown()
        if folder is not None:
            kept = None if clean and args.delete_logs else keep_logs(folder, run_dir)
            if kept is not None:
                _say(f"drugprot serve: Ray logs kept in {kept}")
            if not chosen:
                shutil.rmtree(folder, ignore_errors=True)
        print("drugprot serve: stopped", file=sys.stderr, flush=True)


def rollout_status(options, app_name: str, timeout: float, stop: threading.Event) -> str:
    """The status line of the rollout once the challenger's application settles (running or failed)."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    from drugprot.polling import poll
    from drugprot.serving.app import deployment_failure

    def settled() -> ApplicationStatus | None:
        application = serve.status().applications.get(app_name)
        status = application.status if application is not None else None
        return status if status in (ApplicationStatus.RUNNING, ApplicationStatus.DEPLOY_FAILED) else None

    rollout, status = options.rollout, poll(settled, timeout=timeout, interval=1.0, stop=stop)
    if status == ApplicationStatus.RUNNING:
        share = ("shadows every request (answers come from the champion; GET /v1/model shows the agreement)"
                 if rollout.shadow else f"answers {rollout.canary_percent}% of requests (X-Request-Key picks a "
                                        f"request's side for good)")
        return f"drugprot serve: challenger {rollout.challenger} {share}"
    why = deployment_failure(app_name) if status is not None else f"not running after {timeout:.0f} s"
    return (f"drugprot serve: challenger {rollout.challenger} could not be served ({why}); the champion answers every "
            f"request (GET /v1/model shows the error)")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _wait_ready(url: str, timeout: float, stop: threading.Event) -> bool:
    import requests

    from drugprot.polling import poll

    def ready() -> bool | None:
        try:
            return requests.get(url, timeout=5).status_code == 200 or None
        except requests.RequestException:
            return None

    return bool(poll(ready, timeout=timeout, stop=stop))
