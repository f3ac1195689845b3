"""One job on two CPU processes (``accelerate launch --cpu --num_processes 2``, gloo) against one process
with twice the batch: the same batches, the same gradients, the same weights; one run folder, one MLflow run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from runner.batching import ShardedBatches
from tests.conftest import run_cli, write_triplets

# no dropout anywhere: two processes draw other masks than one, and the comparison is of the arithmetic
NO_DROPOUT = ["+model.random_init.hidden_dropout_prob=0.0", "+model.random_init.attention_probs_dropout_prob=0.0",
              "train.head_dropout=0.0", "train.eval_at_start=false"]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def launch(args: list[str], cwd: Path, processes: int) -> subprocess.CompletedProcess:
    """``python -m runner`` as a user types it, or under ``accelerate launch --cpu --num_processes N``."""
    head = [ACCELERATE, "launch", "--cpu", "--num_processes", str(processes), "--main_process_port", "29517", "-m",
            "runner"] if processes > 1 else [sys.executable, "-m", "runner"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([*head, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def job_args(tiny_overrides: list[str], *extra: str) -> list[str]:
    """The tiny setup with the run folder left to Hydra (each process would pick its own timestamp)."""
    keep = [a for a in tiny_overrides if not a.startswith(("output_dir=", "tracking.uri="))]
    return [*keep, *NO_DROPOUT, "train.log_every=1", *extra]


def run_folders(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in (cwd / "outputs" / "runs").glob("*/*/.hydra"))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted((folder / "model").rglob("*.safetensors")):
        found.update({f"{file.relative_to(folder)}:{k}": v for k, v in load_file(file).items()})
    assert found
    return found


def train_losses(store: Path, experiment: str = "test") -> list[tuple[int, float]]:
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return [(m.step, m.value) for m in sorted(client.get_metric_history(runs[0].info.run_id, "train/loss"),
                                                key=lambda m: m.step)]


def compare(tmp_path: Path, args: list[str], batch: int) -> tuple[Path, Path]:
    """Run ``args`` on two processes with ``batch`` each and on one with ``2 * batch``; the run folders."""
    folders = []
    for processes, size in ((2, batch), (1, 2 * batch)):
        cwd = tmp_path / f"p{processes}"
        cwd.mkdir()
        launch([*args, f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}", f"train.batch_size={size}"], cwd, processes)
        found = run_folders(cwd)
        assert len(found) == 1, found  # one folder for the job, not one per process
        assert (found[0] / "metrics.json").exists()
        folders.append(found[0])
    return folders[0], folders[1]


def test_two_processes_train_the_weights_of_one_with_twice_the_batch(tmp_path, tiny_overrides):
    """96 rows, batch 8 per process = 16 = the single process's batch: 6 optimizer steps an epoch either way
    (max_steps and the scheduler count optimizer steps, not each process's batches)."""
    args = job_args(tiny_overrides, "train.epochs=2")
    two, one = compare(tmp_path, args, batch=8)
    a, b = weights(two), weights(one)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    two_losses, one_losses = train_losses(tmp_path / "p2" / "mlflow.db"), train_losses(tmp_path / "p1" / "mlflow.db")
    assert [s for s, _ in two_losses] == [s for s, _ in one_losses] == list(range(1, 13))
    assert [v for _, v in two_losses] == pytest.approx([v for _, v in one_losses], abs=1e-6)
    # evaluation was sharded over the processes and gathered: every row once, the same metrics
    m2, m1 = json.loads((two / "metrics.json").read_text()), json.loads((one / "metrics.json").read_text())
    assert m2["metrics"] == pytest.approx(m1["metrics"], abs=1e-6)


# slow: 30 s each (two processes); the default suite keeps the plain DDP equality above, under 10 minutes
@pytest.mark.parametrize("loss", [pytest.param("mnrl", marks=pytest.mark.slow), pytest.param("cached_mnrl", marks=pytest.mark.slow)])
def test_in_batch_negatives_are_gathered_across_processes(tmp_path, tiny_overrides, loss):
    """MNRL (and its GradCache form, in mini-batches of 2) on two processes with batch 6 each sees the negatives of one batch of 12: the same loss, step
    by step, and the same weights as one process with batch 12."""
    files = {split: write_triplets(tmp_path / f"{split}.jsonl", n, seed) for split, n, seed in
             (("train", 48, 0), ("dev", 12, 1))}
    args = job_args(tiny_overrides, "data.type=triplet", f"data.train={files['train']}",
                    f"data.validation={files['dev']}", "data.test=null", f"loss={loss}", "train.epochs=1",
                    *(["loss.mini_batch_size=2"] if loss == "cached_mnrl" else []),
                    "objective.metric=val/mrr_at_10")
    two, one = compare(tmp_path, args, batch=6)
    two_losses, one_losses = train_losses(tmp_path / "p2" / "mlflow.db"), train_losses(tmp_path / "p1" / "mlflow.db")
    assert len(two_losses) == 4
    assert [v for _, v in two_losses] == pytest.approx([v for _, v in one_losses], abs=1e-5)
    a, b = weights(two), weights(one)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_each_process_gets_an_equal_share_of_every_batch():
    """Short batches (anywhere in a length-grouped epoch) are topped up with their own first items: both
    processes run the same number of steps on the same number of rows, and no row is dropped."""
    batches = [[0, 1, 2, 3], [4, 5, 6], [7]]
    shares = [list(ShardedBatches(batches, rank, 2)) for rank in range(2)]
    assert shares[0] == [[0, 2], [4, 6], [7]]
    assert shares[1] == [[1, 3], [5, 4], [7]]
    assert sorted({i for share in shares for b in share for i in b}) == list(range(8))  # none dropped


HARDWARE = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "hardware").glob("*.yaml"))


@pytest.mark.parametrize("preset", HARDWARE)
def test_every_hardware_preset_composes_into_its_strategy(make_run, preset):
    """Each conf/hardware file composes, opens with how to launch it (multi-process ones), and turns into
    the accelerate arguments it documents; DeepSpeed on CPU is one clear error, not a traceback."""
    from accelerate.utils import DistributedDataParallelKwargs, FullyShardedDataParallelPlugin

    from runner import distributed
    from runner.errors import RunnerError

    run = make_run(f"hardware={preset}")
    strategy = run.strategy
    text = (Path(__file__).resolve().parent.parent / "conf" / "hardware" / f"{preset}.yaml").read_text()
    if preset in ("auto", "cpu", "gpu"):
        assert isinstance(strategy, distributed.Single) and strategy.accelerator_kwargs() == {}
        return
    assert text.startswith("#") and "launch --num_processes" in text.split("strategy:")[0]
    if preset == "ddp":
        handler = strategy.accelerator_kwargs()["kwargs_handlers"][0]
        assert isinstance(handler, DistributedDataParallelKwargs) and handler.find_unused_parameters is False
    elif preset == "fsdp":
        plugin = strategy.accelerator_kwargs()["fsdp_plugin"]
        assert isinstance(plugin, FullyShardedDataParallelPlugin) and plugin.fsdp_version == 2
        with pytest.raises(RunnerError, match="sharded weights"):  # not a silently partial saved model
            strategy.check("gpu", 2)
        with pytest.raises(RunnerError, match="quietly train with plain DDP"):
            strategy.check("cpu", 2)
    else:
        assert isinstance(strategy, distributed.DeepSpeed) and strategy.zero_stage == int(preset[-1])
        with pytest.raises(RunnerError, match="needs CUDA GPUs"):
            strategy.check("cpu", 2)


def test_deepspeed_options_are_checked(make_run):
    from runner.errors import RunnerError

    with pytest.raises(RunnerError, match="offload_param_device needs zero_stage=3"):
        make_run("hardware=deepspeed_zero2", "hardware.strategy.offload_param_device=cpu")
    run = make_run("hardware=deepspeed_zero3", "hardware.strategy.offload_param_device=cpu",
                   "hardware.strategy.offload_optimizer_device=cpu")
    assert (run.strategy.offload_param_device, run.strategy.offload_optimizer_device) == ("cpu", "cpu")


def test_qlora_on_cpu_is_a_clear_error(tiny_overrides, capsys):
    """mode=qlora (4-bit base weights, bitsandbytes) needs CUDA: on CPU it stops before loading anything."""
    code, out = run_cli([*tiny_overrides, "mode=qlora"], capsys)
    assert code == 1 and "needs a CUDA GPU" in out and "use mode=peft" in out


def test_multirun_under_a_launcher_is_refused(tiny_overrides, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, out = run_cli(["-m", *tiny_overrides, "train.lr=1e-3,2e-3"], capsys)
    assert code == 1 and "--multirun under a launcher" in out


@pytest.mark.slow  # the default suite stays under 10 minutes on 2 cores
def test_a_nan_on_one_process_stops_every_process_with_one_message(tmp_path, tiny_overrides):
    """Process 1 alone sees a NaN loss at step 2: the loss is averaged over processes before the check, so
    both stop at step 2 with the same message, and the launch fails instead of hanging."""
    cwd = tmp_path / "nan"
    cwd.mkdir()
    head = [ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--main_process_port", "29518", "-m", "runner"]
    args = [*job_args(tiny_overrides), f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}", "train.batch_size=8"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "RUNNER_NAN_AT": "1:2"}
    done = subprocess.run([*head, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert out.count("loss is nan at step 2") == 2, out[-3000:]  # rank 0 and rank 1, the same line
    assert "metrics.json" not in {p.name for p in cwd.rglob("*")}


def test_lora_leaves_the_unused_builtin_pooler_alone():
    """BERT's built-in pooler is replaced by runner.pooling: LoRA on its `dense` layer would add weights that
    never get a gradient, which DDP refuses ("parameters that were not used in producing loss")."""
    from transformers import BertConfig, BertModel

    from runner.modes import Lora

    encoder = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32))
    trainable = [n for n, p in Lora(r=2).apply(encoder).named_parameters() if p.requires_grad]
    assert trainable and not [n for n in trainable if ".pooler." in n]
    assert any("attention.self.query.lora_A" in n for n in trainable)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["peft", "head_only"])
def test_other_modes_train_on_two_processes(tmp_path, tiny_overrides, mode):
    cwd = tmp_path / mode
    cwd.mkdir()
    launch([*job_args(tiny_overrides, f"mode={mode}", "train.epochs=1"), f"tracking.uri=sqlite:///{cwd / 'm.db'}"],
           cwd, 2)
    [folder] = run_folders(cwd)
    assert json.loads((folder / "metrics.json").read_text())["metrics"]["val/accuracy"] > 0
