"""The ``drugprot`` command line as a whole: its version, how it refuses an unknown option, and the nearest-key
suggestion that config and search-space files share."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from drugprot.cli import main
from drugprot.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_version_is_the_packages(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"drugprot {version}"


@pytest.mark.parametrize("argv, usage, error", [
    (["tune", "--trials", "3"], "usage: drugprot tune ", "drugprot tune: error: unrecognized arguments: --trials 3"),
    (["data", "check", "--stict"], "usage: drugprot data check ",
     "drugprot data check: error: unrecognized arguments: --stict"),
    (["manifest", "-", "--pin"], "usage: drugprot manifest ", "drugprot manifest: error: unrecognized arguments: --pin"),
])
def test_an_unknown_option_prints_the_subcommands_usage(capsys, argv, usage, error):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and error in err, err


@pytest.mark.parametrize("text, message", [
    ("train:\n  lrr: 1.0e-3\n", r"bad\.yaml: train\.lrr: unknown key; did you mean train\.lr\?$"),
    ("trian:\n  lr: 1.0e-3\n", r"bad\.yaml: trian: unknown key; did you mean train\?$"),
    ("loss:\n  gama: 2\n", r"bad\.yaml: loss\.gama: unknown key; did you mean loss\.gamma\?$"),
    ("train:\n  bogus: 1\n", r"bad\.yaml: train\.bogus: unknown key$"),   # nothing close: no guess
])
def test_a_config_key_typo_names_the_nearest_key(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "bad.yaml")


def test_a_set_typo_is_refused_with_the_suggestion(tmp_path, capsys):
    code = main(["train", "--config", str(REPO / "configs" / "smoke.yaml"), "--set", "train.lrr=1e-4",
                 "--out", str(tmp_path / "run")])
    assert code == 1
    assert "train.lrr: unknown key; did you mean train.lr?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_search_space_suggests_from_the_same_code(tmp_path):
    from drugprot.tuning.space import SpaceError, load_space

    (tmp_path / "bad.yaml").write_text("params:\n  train.lrr: {loguniform: [1.0e-5, 1.0e-4]}\n")
    with pytest.raises(SpaceError, match=r"params\.train\.lrr: unknown config key 'train\.lrr' \(train has: .*\); "
                                         r"did you mean train\.lr\?"):
        load_space(tmp_path / "bad.yaml")
