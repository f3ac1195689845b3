"""Images and text: dual encoders (CLIP, SigLIP, LiT) trained, saved, reloaded with transformers, evaluated and
predicted like text models; bad image inputs; the image-text losses and metrics by hand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from runner import checkpoint, train
from runner.losses import CachedImageTextContrastive, ImageTextContrastive
from runner.metrics import image_text_metrics
from runner.sample_images import WORDS
from tests.conftest import run_cli


def write_digits(folder: Path, n: int, start: int = 0) -> Path:
    """``n`` sklearn digits as PNG files beside a csv of image, caption, label (paths relative to the csv)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        name = f"img/{i:04d}.png"
        Image.fromarray((255 - data.images[i] * 255 / 16).astype(np.uint8), mode="L").save(folder / name)
        word = WORDS[data.target[i]]
        rows.append([name, f"a handwritten digit {word}", word])
    path = folder / f"pairs_{start}.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption", "label"], *rows])
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("digits")
    return {"train": write_digits(folder, 192), "test": write_digits(folder, 64, start=1400)}


def base(tmp_path: Path, model: str, train_file: Path, *extra: str) -> list[str]:
    return [f"model={model}", "data=csv", "data.type=image_text", f"data.train={train_file}", "data.text_field=caption",
            "hardware=cpu", "precision=fp32", "train.epochs=2", "train.batch_size=32", "train.progress=false",
            "train.lr=1e-3", f"output_dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.log_model=false", *extra]


@pytest.mark.parametrize("model", ["tiny_clip", pytest.param("tiny_siglip", marks=pytest.mark.slow)])
def test_dual_encoder_trains_saves_and_reloads_with_transformers(model, digits, tmp_path, capsys):
    from transformers import AutoTokenizer, CLIPModel, SiglipModel

    from runner.images import load_processor, pixel_values
    from runner.predict import PredictConfig, predict

    code, out = run_cli(base(tmp_path, model, digits["train"]), capsys)
    assert code == 0, out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["objective"]["metric"] == "val/mean_recall"
    assert 0 <= metrics["metrics"]["val/i2t_recall_at_5"] <= 1
    folder = tmp_path / "run" / "model"
    cls = CLIPModel if model == "tiny_clip" else SiglipModel
    reloaded = cls.from_pretrained(folder).eval()  # transformers' own class, nothing of the runner's
    processor = load_processor(str(folder), None)
    images = [str(digits["train"].parent / f"img/{i:04d}.png") for i in range(3)]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    padding = "max_length" if model == "tiny_siglip" else "longest"
    tokens = tokenizer(["a handwritten digit zero"], padding=padding, max_length=16 if model == "tiny_siglip" else 32,
                       return_tensors="pt")
    with torch.no_grad():
        theirs_images = reloaded.get_image_features(pixel_values=pixel_values(processor, images)).pooler_output
        theirs_text = reloaded.get_text_features(**tokens).pooler_output
    rows = predict(PredictConfig(model_dir=str(folder), input=str(digits["train"]), embeddings=True, precision="fp32",
                                 data={"text_field": "caption"}))
    assert len(rows) == 192 and rows[0]["image"].endswith("0000.png")
    mine = torch.tensor([rows[i]["image_embedding"] for i in range(3)])
    assert torch.allclose(mine, theirs_images, atol=1e-4)
    assert torch.allclose(torch.tensor(rows[0]["text_embedding"]), theirs_text[0], atol=1e-4)
    # ONNX: each tower, parity with PyTorch on new inputs
    import onnxruntime

    from runner.export import export_onnx

    export_onnx(folder, tmp_path / "onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "image.onnx"))
    pixels = pixel_values(processor, images)
    assert np.abs(session.run(None, {"pixel_values": pixels.numpy()})[0] - theirs_images.numpy()).max() <= 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "text.onnx"))
    got = session.run(None, {k: v.numpy() for k, v in tokens.items() if k in [i.name for i in session.get_inputs()]})[0]
    assert np.abs(got - theirs_text.numpy()).max() <= 1e-4
    # the MLflow pyfunc: base64 images and texts in, the same embeddings out; a bad image is the client's error
    import base64

    from runner.mlflow_model import log_pyfunc

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.get_experiment_by_name("runner").experiment_id).info.run_id
    log_pyfunc(client, run_id, folder)
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    encoded = [base64.b64encode(Path(p).read_bytes()).decode() for p in images]
    import pandas as pd

    answer = served.predict(pd.DataFrame({"image": encoded, "text": ["a handwritten digit zero"] * 3}))
    assert torch.allclose(torch.tensor([r["image_embedding"] for r in answer]), theirs_images, atol=1e-4)
    assert torch.allclose(torch.tensor(answer[0]["text_embedding"]), theirs_text[0], atol=1e-4)
    with pytest.raises(mlflow.exceptions.MlflowException, match="bad input"):
        served.predict(pd.DataFrame({"image": [base64.b64encode(b"not an image").decode()]}))
    # zero-shot labels over given classes
    rows = predict(PredictConfig(model_dir=str(folder), input=str(digits["test"]), precision="fp32",
                                 classes=["zero", "one"], prompt="a handwritten digit {}"))
    assert {r["label"] for r in rows} <= {"zero", "one"}
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-4


def test_zero_shot_classes_train_in_k_folds_and_evaluate(digits, tmp_path, capsys):
    """data.type=image: images against their class prompts; k-fold as for text classes; evaluate again."""
    code, out = run_cli([*base(tmp_path, "tiny_clip", digits["train"], "data.type=image", "data.label_field=label",
                               "cv.folds=2", "task.prompt=a handwritten digit {}")], capsys)
    assert code == 0, out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["cv/val/accuracy_mean"] <= 1
    model_dir = next((tmp_path / "run").rglob("runner_model.json")).parent
    meta = json.loads((model_dir / "runner_model.json").read_text())
    assert sorted(meta["labels"]) == sorted(WORDS) and meta["prompt"] == "a handwritten digit {}"
    from runner.evaluate import EvaluateConfig, evaluate

    result = evaluate(EvaluateConfig(model_dir=str(model_dir), tracking=False, data={"test": str(digits["test"])},
                                     progress=False))
    assert result["rows"] == 64 and 0 <= result["metrics"]["test/accuracy"] <= 1
    assert result["report"]["confusion_matrix"]["labels"] == meta["labels"]


def test_a_text_model_refuses_images_and_a_dual_encoder_refuses_text(digits, tmp_path, capsys):
    code, out = run_cli(base(tmp_path, "tiny", digits["train"]), capsys)
    assert code == 1 and "needs a dual encoder (model=clip, model=siglip, model=lit)" in out
    code, out = run_cli([*base(tmp_path, "tiny_clip", digits["train"], "data.type=single", "data.text_field=caption")],
                        capsys)
    assert code == 1 and "is a dual image-text encoder" in out
    code, out = run_cli(base(tmp_path, "tiny_clip", digits["train"], "mode.freeze_layers=1"), capsys)
    assert code == 1 and "mode.freeze_layers applies to text encoders" in out


# ---- bad image inputs ------------------------------------------------------------------------------------------

def broken(folder: Path, kind: str) -> tuple[str, str]:
    """A broken image of ``kind`` at row 4 (the 3rd data row) of a copy of the digits csv: (csv overrides, what the error names)."""
    rows = list(csv.reader(open(next(folder.glob("pairs_0.csv")))))
    name = f"bad_{kind}.png"
    target = folder / "img" / name
    if kind == "corrupt":
        good = (folder / "img" / "0000.png").read_bytes()
        target.write_bytes(good[: len(good) // 2])  # a truncated PNG
    elif kind == "zero-byte":
        target.write_bytes(b"")
    elif kind == "directory":
        target.mkdir(exist_ok=True)
    rows[3][0] = f"img/{name}"  # kind "missing": the file is never written
    path = folder / f"broken_{kind}.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return str(path), name


@pytest.mark.parametrize("kind,why", [("missing", "no such file"), ("corrupt", "not a readable image"),
                                      ("zero-byte", "empty file, 0 bytes"), ("directory", "is a directory")])
def test_a_bad_image_is_one_error_naming_file_row_and_column(kind, why, digits, tmp_path, capsys):
    path, name = broken(digits["train"].parent, kind)
    code, out = run_cli(base(tmp_path, "tiny_clip", Path(path)), capsys)
    assert code == 1, out
    error = next(line for line in out.splitlines() if "error:" in line)
    assert f"broken_{kind}.csv: row 4, column 'image': img/{name}: {why}" in error
    assert "Traceback" not in out and not (tmp_path / "mlflow.db").exists() or "FAILED" not in out


def test_a_wrong_image_column_is_named(digits, tmp_path, capsys):
    code, out = run_cli(base(tmp_path, "tiny_clip", digits["train"], "data.image_field=picture"), capsys)
    assert code == 1 and "no column 'picture' (data.image_field)" in out and "['image', 'caption', 'label']" in out


def test_bad_images_skip_counts_them_in_the_log_and_mlflow(digits, tmp_path, capsys):
    folder = digits["train"].parent
    rows = list(csv.reader(open(digits["train"])))
    for kind, row in (("missing", 2), ("corrupt", 5), ("zero-byte", 9), ("directory", 11)):
        broken(folder, kind)
        rows[row][0] = f"img/bad_{kind}.png"
    path = folder / "broken_all.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    code, out = run_cli(base(tmp_path, "tiny_clip", path, "data.bad_images=skip", "train.epochs=1"), capsys)
    assert code == 0, out
    assert "4 rows with unreadable images skipped" in out
    counted = json.loads((tmp_path / "run" / "data_sources.json").read_text())[0]
    assert counted["rows"] == 192
    assert sum(v for k, v in counted["skipped"].items() if k.startswith("unreadable images")) == 4
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("runner").experiment_id])[0]
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="data_sources.json",
                                                                 tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")).read_text())
    assert logged == json.loads((tmp_path / "run" / "data_sources.json").read_text())
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert data["objective"]["value"] >= 0


# ---- resume ----------------------------------------------------------------------------------------------------

class SimulatedKill(BaseException):
    pass


def test_an_image_run_killed_mid_epoch_resumes_bit_exactly(digits, tmp_path, monkeypatch, capsys):
    """As text runs (tests/test_resume.py): killed at step 5 of 12, resumed; the weights equal an uninterrupted run's."""
    from safetensors.torch import load_file

    def overrides(name):
        return [*base(tmp_path / name, "tiny_clip", digits["train"], "train.epochs=2", "train.checkpoint_every=4",
                      "train.deterministic=true", "train.batch_size=16")]

    assert run_cli(overrides("whole"), capsys)[0] == 0

    def crash(kind, step):
        if (kind, step) == ("step", 5):
            raise SimulatedKill()
    monkeypatch.setattr(train, "crash_point", crash)
    with pytest.raises(SimulatedKill):
        run_cli(overrides("killed"), capsys)
    monkeypatch.undo()
    code, out = run_cli(overrides("killed"), capsys)
    assert code == 0 and "resuming from" in out
    whole = load_file(tmp_path / "whole" / "run" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "run" / "model" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert checkpoint is not None


# ---- losses and metrics by hand --------------------------------------------------------------------------------

def test_clip_loss_is_the_mean_of_both_cross_entropies_with_repeats_masked():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    texts = torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.5, 1.0]])
    log_scale = torch.tensor(np.log(10.0), dtype=torch.float32)
    ids = torch.tensor([[0, 1, 2], [0, 1, 2]])
    loss = ImageTextContrastive("softmax", gather_across_ranks=False).compute(images, texts, ids, log_scale)
    sims = nn.functional.normalize(images, dim=-1) @ nn.functional.normalize(texts, dim=-1).T * 10
    target = torch.arange(3)
    expected = (nn.functional.cross_entropy(sims, target) + nn.functional.cross_entropy(sims.T, target)) / 2
    assert torch.allclose(loss, expected)
    # rows 0 and 2 share a caption: neither is the other's negative
    ids = torch.tensor([[0, 1, 2], [7, 8, 7]])
    loss = ImageTextContrastive("softmax", gather_across_ranks=False).compute(images, texts, ids, log_scale)
    masked = sims.clone()
    masked[0, 2] = masked[2, 0] = float("-inf")
    expected = (nn.functional.cross_entropy(masked, target) + nn.functional.cross_entropy(masked.T, target)) / 2
    assert torch.allclose(loss, expected)


def test_sigmoid_loss_scores_every_pair_with_bias():
    images, texts = torch.randn(4, 3), torch.randn(4, 3)
    log_scale, bias = torch.tensor(np.log(10.0), dtype=torch.float32), torch.tensor([-2.0])
    ids = torch.tensor([[0, 1, 2, 3], [5, 6, 5, 7]])
    loss = ImageTextContrastive("auto", gather_across_ranks=False).compute(images, texts, ids, log_scale, bias)
    sims = nn.functional.normalize(images, dim=-1) @ nn.functional.normalize(texts, dim=-1).T * 10 - 2
    labels = -torch.ones(4, 4)
    labels[torch.arange(4), torch.arange(4)] = 1
    labels[0, 2] = labels[2, 0] = 1  # the same caption
    expected = -nn.functional.logsigmoid(labels * sims).sum() / 4
    assert torch.allclose(loss, expected)
    with pytest.raises(Exception, match="loss=siglip needs a model with a learnable logit bias"):
        ImageTextContrastive("sigmoid").compute(images, texts, ids, log_scale, None)


class TwoTowers(nn.Module):
    """Two linear towers with dropout and a temperature: what the losses see of a dual encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.image, self.text = nn.Sequential(nn.Dropout(0.3), nn.Linear(6, 4)), nn.Embedding(20, 4)
        self.logit_scale, self.logit_bias = nn.Parameter(torch.tensor(2.0)), None

    def forward(self, features):
        if "pixel_values" in features:
            return self.image(features["pixel_values"])
        return self.text(features["input_ids"]).mean(1)


def test_gradcache_gives_the_gradients_of_the_whole_batch():
    torch.manual_seed(0)
    model = TwoTowers()
    batch = {"features": [{"pixel_values": torch.randn(10, 6)}, {"input_ids": torch.randint(0, 20, (10, 3))}],
             "text_ids": torch.stack([torch.arange(10), torch.tensor([0, 1, 2, 3, 4, 0, 5, 6, 7, 8])])}
    grads = []
    for loss_fn in (ImageTextContrastive("softmax", False), CachedImageTextContrastive("softmax", False, mini_batch_size=3)):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks: GradCache replays each mini-batch's RNG state
        loss_fn(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_image_text_metrics_by_hand():
    # 3 images, captions A, B, A (images 0 and 2 share a caption): distinct captions A, B
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    texts = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, 0.0]], dtype=np.float32)  # B points near A: image 1 ranks it 1st
    ids = np.array([[0, 1, 2], [0, 1, 0]])
    m = image_text_metrics(images, texts, ids, "val")
    # i2t: image 0 -> A rank 1; image 1 -> B (cos .0995 vs 0 for A) rank 1; image 2 -> A (.6) vs B (.68): rank 2
    assert m["val/i2t_recall_at_1"] == pytest.approx(2 / 3) and m["val/i2t_mrr"] == pytest.approx((1 + 1 + 0.5) / 3)
    # t2i: A -> images 0 (1.0), 2 (.6), 1 (0): first relevant rank 1; B -> image 2 (.68) first, image 1 (.0995) rank 3
    assert m["val/t2i_recall_at_1"] == pytest.approx(0.5) and m["val/t2i_mrr"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["val/t2i_recall_at_5"] == 1.0


# ---- two processes ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # 30 s each: two processes, as the MNRL gathering tests
@pytest.mark.parametrize("model,loss", [("tiny_clip", "clip"), ("tiny_siglip", "siglip")])
def test_negatives_are_gathered_across_processes(model, loss, digits, tmp_path):
    """Two processes with batch 16 each see the negatives of one batch of 32: the same loss step by step (within
    1e-5) and the same weights as one process with batch 32."""
    from tests.test_distributed import compare, train_losses, weights

    args = [f"model={model}", "data=csv", "data.type=image_text", f"data.train={digits['train']}",
            "data.text_field=caption", "hardware=cpu", "precision=fp32", "train.epochs=1", "train.progress=false",
            "train.lr=1e-3", "train.log_every=1", "train.eval_at_start=false", "tracking.log_model=false",
            "tracking.experiment=test", f"loss={loss}"]
    two, one = compare(tmp_path, args, batch=16)
    two_losses, one_losses = train_losses(tmp_path / "p2" / "mlflow.db"), train_losses(tmp_path / "p1" / "mlflow.db")
    assert len(two_losses) == 6  # 172 training rows (192 less the validation split) in batches of 32
    assert [v for _, v in two_losses] == pytest.approx([v for _, v in one_losses], abs=1e-5)
    a, b = weights(two), weights(one)
    # a key projection's bias has no effect on attention (softmax ignores a constant per query): its gradient is
    # rounding noise, which Adam scales up to full steps, differently on each side; every other weight agrees
    keys = [k for k in a if not k.endswith("k_proj.bias")]
    assert len(keys) > 40
    for key in keys:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


# ---- modes per tower -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,trained,frozen,start", [  # two of three in nox -s slow: the default suite stays short
    pytest.param("mode=full mode.towers=[vision]", "vision_model", "text_model", "mode=head_only", marks=pytest.mark.slow),
    ("mode=peft mode.towers=[text]", "text_model", "vision_model", "mode=head_only"),
    pytest.param("mode=head_only", "visual_projection", "vision_model", "mode=full mode.towers=[text]",
                 marks=pytest.mark.slow),
])
def test_modes_apply_per_tower(mode, trained, frozen, start, digits, tmp_path, capsys):
    """The mode's towers learn (LoRA merged into the saved weights), the others are bit-identical to the starting
    weights (the same seed: a run in which that tower was frozen too saved them)."""
    from safetensors.torch import load_file

    assert run_cli(base(tmp_path / "a", "tiny_clip", digits["train"], "train.epochs=1", *start.split()), capsys)[0] == 0
    code, out = run_cli(base(tmp_path / "b", "tiny_clip", digits["train"], "train.epochs=1", *mode.split()), capsys)
    assert code == 0, out
    before = load_file(tmp_path / "a" / "run" / "model" / "model.safetensors")
    after = load_file(tmp_path / "b" / "run" / "model" / "model.safetensors")
    assert before.keys() == after.keys()  # LoRA merged: the saved folder is a plain CLIPModel
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith(trained) for k in changed)
    assert not any(k.startswith(frozen) for k in changed)
    if "peft" in mode:
        assert any("q_proj" in k for k in changed if k.startswith("text_model"))


def test_mode_towers_is_for_dual_encoders(tiny_overrides, capsys):
    code, out = run_cli([*tiny_overrides, "mode.towers=[text]"], capsys)
    assert code == 1 and "mode.towers applies to dual image-text encoders" in out


def test_a_linear_probe_trains_a_head_on_cached_image_embeddings(digits, tmp_path, capsys):
    """data.type=image mode=head_only: a linear classifier on the frozen image tower, its embeddings computed once
    (the second job reads the cache); saved with the dual encoder, it predicts and evaluates images."""
    from runner.evaluate import EvaluateConfig, evaluate
    from runner.predict import PredictConfig, predict

    args = base(tmp_path, "tiny_clip", digits["train"], "data.type=image", "data.label_field=label", "mode=head_only",
                f"data.test={digits['test']}", "train.epochs=20", "train.lr=1e-2", f"cache.dir={tmp_path / 'cache'}")
    code, out = run_cli(args, capsys)
    assert code == 0, out
    assert "frozen image tower: 256 images embedded, 0 from the cache" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.search_runs([client.get_experiment_by_name("runner").experiment_id])[0].info.run_id
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "val/loss"), key=lambda m: m.step)]
    assert losses[-1] < losses[0] - 0.1  # the head learns (on a random tiny tower: no more is promised)
    code, out = run_cli([*args, f"output_dir={tmp_path / 'again'}"], capsys)
    assert code == 0 and "0 images embedded, 256 from the cache" in out
    folder = tmp_path / "run" / "model"
    rows = predict(PredictConfig(model_dir=str(folder), input=str(digits["test"]), precision="fp32"))
    assert len(rows) == 64 and rows[0]["label"] in WORDS
    result = evaluate(EvaluateConfig(model_dir=str(folder), tracking=False, data={"test": str(digits["test"])},
                                     progress=False, precision="fp32"))
    assert result["metrics"]["test/accuracy"] == pytest.approx(metrics["test/accuracy"], abs=1 / 64)


@pytest.mark.slow  # 5 s: two trainings
def test_a_dual_encoder_learns_from_a_teacher_dual_encoder(digits, tmp_path, capsys):
    """distill.teacher: a saved dual encoder (or self); its batch similarity distributions join the loss, logged as
    train/distill; a teacher that reads other pixels is refused before training."""
    assert run_cli(base(tmp_path / "t", "tiny_clip", digits["train"], "train.epochs=1"), capsys)[0] == 0
    teacher = tmp_path / "t" / "run" / "model"
    code, out = run_cli(base(tmp_path / "s", "tiny_clip", digits["train"], "train.epochs=1", f"distill.teacher={teacher}",
                             "distill.alpha=0.5", "train.log_every=1",
                             "model.random_init.projection_dim=16"), capsys)  # another embedding size than the teacher's
    assert code == 0, out
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 's' / 'mlflow.db'}")
    run_id = client.search_runs([client.get_experiment_by_name("runner").experiment_id])[0].info.run_id
    distill = [m.value for m in client.get_metric_history(run_id, "train/distill")]
    assert len(distill) >= 5 and all(v >= 0 for v in distill) and any(v > 0 for v in distill)
    code, out = run_cli(base(tmp_path / "x", "tiny_clip", digits["train"], "train.epochs=1", f"distill.teacher={teacher}",
                             "model.image_processor.crop_size.height=24", "model.image_processor.crop_size.width=24"),
                        capsys)
    assert code == 1 and "preprocesses images otherwise than the student" in out
    assert not (tmp_path / "x" / "mlflow.db").exists()  # refused before any run opened


@pytest.mark.slow  # 7 s: worker processes and a sweep
def test_images_decode_in_loader_workers_and_sweeps_run(digits, tmp_path, capsys):
    """hardware.num_workers=2: the collator (image decoding) runs in worker processes, with the same metrics as in
    the main process; a --multirun sweep over the learning rate runs one job per value."""
    args = base(tmp_path, "tiny_clip", digits["train"], "train.epochs=1")
    assert run_cli(args, capsys)[0] == 0
    inline = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert run_cli([*args, "hardware.num_workers=2", f"output_dir={tmp_path / 'workers'}"], capsys)[0] == 0
    workers = json.loads((tmp_path / "workers" / "metrics.json").read_text())["metrics"]
    assert workers == pytest.approx(inline, abs=1e-6)
    sweep = [a for a in args if not a.startswith("output_dir=")]
    code, out = run_cli(["--multirun", *sweep, "train.lr=1e-3,1e-4", f"hydra.sweep.dir={tmp_path / 'sweep'}"], capsys)
    assert code == 0, out
    assert len(list((tmp_path / "sweep").glob("*/metrics.json"))) == 2


@pytest.mark.slow  # 5 s: two trainings
def test_a_saved_dual_encoder_trains_on_from_its_folder_with_gradcache(digits, tmp_path, capsys):
    """A local folder of a dual encoder (here the runner's own saved one: a transformers folder) as
    model.name_or_path, trained further with loss=cached_clip (GradCache through both towers, mini-batches of 8)."""
    assert run_cli(base(tmp_path / "a", "tiny_clip", digits["train"], "train.epochs=1"), capsys)[0] == 0
    folder = tmp_path / "a" / "run" / "model"
    code, out = run_cli(base(tmp_path / "b", "tiny_clip", digits["train"], "train.epochs=1", "model.random_init=null",
                             "model.image_processor=null", f"model.name_or_path={folder}", "model.tokenizer=null",
                             "loss=cached_clip", "loss.mini_batch_size=8"), capsys)
    assert code == 0, out
    assert "clip dual encoder" in out
    assert json.loads((tmp_path / "b" / "run" / "metrics.json").read_text())["metrics"]["val/mean_recall"] >= 0


@pytest.mark.slow
def test_mlflow_models_serve_answers_images_and_texts(digits, tmp_path, capsys):
    """The logged model behind ``mlflow models serve``: base64 images and texts in, runner.predict's embeddings
    out; a request with a broken image is answered 400 with a message, and the server keeps answering."""
    import base64
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from runner.predict import PredictConfig, predict
    from tests.test_mlflow_model import free_port, wait_for

    args = base(tmp_path, "tiny_clip", digits["train"], "train.epochs=1")
    code, out = run_cli([a for a in args if a != "tracking.log_model=false"], capsys)
    assert code == 0, out
    run_id = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    port = free_port()
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    images = [str(digits["test"].parent / f"img/{i:04d}.png") for i in range(1400, 1403)]

    def ask(records):
        body = json.dumps({"dataframe_records": records}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]

    try:
        wait_for(f"http://127.0.0.1:{port}/ping")
        answer = ask([{"image": base64.b64encode(Path(p).read_bytes()).decode(), "text": "a handwritten digit one"}
                      for p in images])
        with pytest.raises(urllib.error.HTTPError) as bad:
            ask([{"image": base64.b64encode(b"\x89PNG broken").decode()}])
        assert bad.value.code == 400 and "cannot decode this image" in bad.value.read().decode()
        assert len(ask([{"text": "still answering"}])) == 1
    finally:
        server.terminate()
        server.wait(timeout=30)
    want = predict(PredictConfig(model_dir=str(tmp_path / "run" / "model"), input=str(digits["test"]), embeddings=True,
                                 data={"text_field": "caption"}))
    for got, row in zip(answer, want[:3]):
        assert np.allclose(got["image_embedding"], row["image_embedding"], atol=1e-4)
    [text] = predict(PredictConfig(model_dir=str(tmp_path / "run" / "model"), text="a handwritten digit one"))
    assert np.allclose(answer[0]["text_embedding"], text["text_embedding"], atol=1e-4)


def test_texts_longer_than_the_text_tower_takes_are_refused(digits, tmp_path, capsys):
    code, out = run_cli(base(tmp_path, "tiny_clip", digits["train"], "model.max_length=100"), capsys)
    assert code == 1 and "model.max_length=100 but this text tower takes at most 64 tokens" in out


def test_a_saved_dataset_with_images_inside_trains_and_predicts(digits, tmp_path, capsys, monkeypatch):
    """A save_to_disk DatasetDict whose image column is datasets' Image feature (the bytes inside, as hub image
    datasets are): the images become files in the cache once, a chunk at a time; training, k-fold and predict read
    them like image files; a second job writes none again."""
    import datasets

    from runner.predict import PredictConfig, predict

    rows = list(csv.reader(open(digits["train"])))[1:]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=WORDS)})
    root = digits["train"].parent

    def split(part):
        return datasets.Dataset.from_dict({"image": [str(root / r[0]) for r in part], "caption": [r[1] for r in part],
                                           "label": [WORDS.index(r[2]) for r in part]}, features=features)

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": split(rows[:160]), "test": split(rows[160:])}).save_to_disk(str(folder))
    monkeypatch.setenv("RUNNER_ARROW_CACHE", str(tmp_path / "cache"))
    args = base(tmp_path, "tiny_clip", folder / "train", "train.epochs=1", f"data.test={folder / 'test'}")
    code, out = run_cli(args, capsys)
    assert code == 0, out
    assert "160 images stored in the dataset's 'image' column" in out and "(160 new)" in out
    assert len(list((tmp_path / "cache" / "images").glob("*.png"))) == 192
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["test/i2t_recall_at_1"] <= 1
    code, out = run_cli([*args[:-1], "data.type=image", "data.label_field=label", "cv.folds=2",
                         f"output_dir={tmp_path / 'kfold'}"], capsys)
    assert code == 0 and "(0 new)" in out, out
    rows = predict(PredictConfig(model_dir=str(tmp_path / "run" / "model"), input=str(folder / "test"),
                                 classes=["zero", "one"], prompt="a handwritten digit {}"))
    assert len(rows) == 32 and rows[0]["label"] in ("zero", "one")


def test_a_hub_split_with_images_inside_is_read_as_files(digits, tmp_path, monkeypatch):
    """data.hub: what datasets.load_dataset gives (here the same Dataset read from a local parquet file, as the hub
    serves it: the hub is unreachable) goes through the same conversion: paths to files in the cache."""
    import datasets

    from runner.data import read_hub_split
    from runner.schema import DataConfig, DataType

    rows = list(csv.reader(open(digits["train"])))[1:21]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [str(digits["train"].parent / r[0]) for r in rows],
                                "caption": [r[1] for r in rows]}, features=features).to_parquet(str(tmp_path / "t.parquet"))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_parquet(str(tmp_path / "t.parquet")))
    monkeypatch.setenv("RUNNER_ARROW_CACHE", str(tmp_path / "cache"))
    frame = read_hub_split(DataConfig(type=DataType.image_text, hub="someone/images", train="train"), "train")
    assert list(frame.columns) == ["image", "caption"] and len(frame) == 20
    assert all(Path(p).read_bytes() == (digits["train"].parent / r[0]).read_bytes() for p, r in zip(frame["image"], rows))


def test_an_image_processor_setting_it_does_not_take_is_an_error(digits, tmp_path, capsys):
    """model.image_processor is the user's config: a misspelled key would be ignored, so it is refused by name."""
    code, out = run_cli(base(tmp_path, "tiny_clip", digits["train"], "+model.image_processor.image_men=[0.5,0.5,0.5]"),
                        capsys)
    assert code == 1 and "model.image_processor: image_men is not a setting of CLIPImageProcessor" in out
