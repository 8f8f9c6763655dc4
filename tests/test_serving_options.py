"""serving.options and the ``drugprot serve`` flags that fill it: deployment options, every refused setting, the CLI
checks made before Ray starts."""

from __future__ import annotations


import pytest

from drugprot.errors import DrugprotError
from drugprot.inference import InferenceOptions
from drugprot.serving.options import parse_options


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
     r"serve args: precision: must be one of bf16, fp32, cascade, got 'auto'"),
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
