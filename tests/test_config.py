"""Every shipped config composes, binds to its component, and bad input fails at once with a clear message."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from runner.run import CONF_DIR
from runner.schema import RunConfig
from tests.conftest import ROOT, compose_config

GROUPS = ["model", "pooling", "mode", "data", "precision", "hardware", "hparams_search"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((Path(CONF_DIR) / g).glob("*.yaml"))]


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_into_the_typed_run(group, option):
    overrides = [f"{group}={option}", "output_dir=/tmp/x"]
    if (group, option) == ("data", "csv"):
        overrides.append("data.train=train.csv")
    cfg = compose_config(overrides, with_hydra=group == "hparams_search")
    if group == "hparams_search":  # a search preset: it configures the Optuna sweeper and the mode
        assert cfg.hydra.sweeper._target_ == "runner.optuna_sweeper.ResumableOptunaSweeper"
        storage = OmegaConf.to_container(cfg.hydra.sweeper, resolve=False)["storage"]
        assert cfg.hydra.sweeper.params and storage == "sqlite:///${hydra:runtime.cwd}/outputs/optuna.db"
        assert cfg.mode._target_.startswith("runner.modes.")
        return
    run = OmegaConf.to_object(cfg)
    assert isinstance(run, RunConfig)
    assert OmegaConf.select(cfg, group) is not None


@pytest.mark.parametrize("group", ["pooling", "mode"])
def test_component_configs_bind_to_their_constructor(group):
    """A key in a YAML that its ``_target_`` does not accept fails here, without building anything."""
    for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
        cfg = compose_config([f"{group}={path.stem}", "output_dir=/tmp/x"])[group]
        node = OmegaConf.to_container(cfg)
        target = get_class(node.pop("_target_"))
        inspect.signature(target).bind(**node)


def test_mode_sets_its_learning_rate_and_command_line_wins():
    head_only = compose_config(["mode=head_only", "output_dir=x"]).train
    assert (head_only.lr, head_only.epochs) == (pytest.approx(5e-3), 20)
    assert compose_config(["mode=peft", "train.lr=1e-4", "output_dir=x"]).train.lr == pytest.approx(1e-4)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_unknown_group_option_names_the_allowed_values():
    out = cli("pooling=nope")
    assert out.returncode != 0
    assert "pooling/nope" in out.stderr
    for option in ["cls", "lasttoken", "max", "mean", "weighted"]:
        assert option in out.stderr
    assert "Traceback" not in out.stderr


def test_wrong_type_names_the_key_and_type():
    out = cli("train.lr=abc")
    assert out.returncode != 0
    assert "train.lr" in out.stderr and "abc" in out.stderr and "float" in out.stderr.lower()
    assert "Traceback" not in out.stderr


def test_unknown_key_is_an_error():
    out = cli("train.learning_rate=0.1")
    assert out.returncode != 0
    assert "train.learning_rate" in out.stderr
