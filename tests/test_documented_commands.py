"""Every command the README and the first lines of conf/ files show runs as written, through the real CLI
(``python -m ...`` in a subprocess), so that no documented line fails for a new user.

Commands are collected from the README's ```bash blocks (continued lines joined) and from the comment lines
that open each ``conf/`` file. Each runs in a fresh folder holding the files the README names (generated
tiny ones: train.csv, SMSSpamCollection, SICK.txt, ...), on the tiny model where it names a large model,
on local files (../shared/data) where it names a hub dataset, and shortened (2 optimizer steps, 2 trials)
so the whole list runs in minutes: what is checked is that the command as written is accepted and runs to
its end. Commands that need what this machine lacks (GPUs, a PostgreSQL server, the network) are listed in
NOT_HERE with the test that covers them instead; a new documented command must either run or be listed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, SHARED_DATA, make_sentences, multi_label_rows, write_csv

README = ROOT / "README.md"
CONF = ROOT / "conf"

NOT_HERE = {  # a documented command this machine cannot run -> why, and what covers it
    "accelerate launch --num_processes": "needs several GPUs (tests/test_distributed.py runs the CPU launcher line)",
    "torchrun --nproc_per_node 4": "needs 4 GPUs (FSDP2)",
    "mode=qlora": "4-bit bitsandbytes needs a CUDA GPU",
    "initdb": "a PostgreSQL server (tests/test_sweep_workers.py starts one)",
    "for w in 1 2 3": "three workers on a PostgreSQL store (tests/test_sweep_workers.py)",
    "journal:/shared/": "a shared file system path (tests/test_sweep_workers.py uses a journal file)",
    "mlflow server": "a long-running server (tests/test_tracking_server.py)",
    "mlflow ui": "a long-running server (tests/test_mlflow_ui.py)",
    "mlflow models serve": "a long-running server (tests/test_mlflow_model.py)",
    "python -m runner.serve": "a long-running server (tests/test_serve.py starts one over HTTP)",
    "pip install": "the install itself (.ci/run)",
    "python -m pytest": "the test suite itself",
    "model.name_or_path=/path/to/": "a placeholder for the user's own model folder",
    "hardware=gpu": "needs a CUDA GPU",
    "$STORE": "a PostgreSQL store and an MLflow server (tests/test_sweep_workers.py, tests/test_tracking_server.py)",
    "hydra/launcher=slurm": "a SLURM cluster (tests/test_launchers.py composes it and runs submitit_local)",
}
PREFIXES = ("python -m runner", "runner ", "accelerate launch", "torchrun", "mlflow ", "eval ", "initdb", "for w",
            "pip install", "python -m pytest")


def readme_commands() -> list[str]:
    """Commands of the README's bash blocks, continuation lines joined, comments dropped."""
    commands, block = [], None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            block = [] if block is None and line.strip() in ("```bash", "```sh") else None
            continue
        if block is None:
            continue
        if commands and commands[-1].endswith("\\"):
            commands[-1] = commands[-1][:-1] + " " + line.strip()
            continue
        commands.append(line.strip())
    out = []
    for command in commands:
        command = re.sub(r"\s+#\s.*$", "", command).strip()  # a trailing comment (never inside these commands' quotes)
        if command.startswith(PREFIXES):
            out.append(command)
    return out


def conf_commands() -> list[str]:
    """The commands in the comment lines that open each conf/ file (before its first key)."""
    out = []
    for path in sorted(CONF.rglob("*.yaml")):
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            text = line.lstrip("# ").strip()
            if out and out[-1].endswith("\\"):  # a continued command
                out[-1] = out[-1][:-1].strip() + " " + re.split(r"\s{2,}|\s\(", text)[0].strip()
                continue
            start = min((text.find(p) for p in ("python -m runner", "accelerate launch", "torchrun") if p in text),
                        default=-1)
            if start >= 0:  # "Any local file: python -m runner ...": the command, without its note
                out.append(re.split(r"\s{2,}|\s\(|: ", text[start:])[0].strip())
    return out


def documented() -> list[str]:
    seen, out = set(), []
    for command in readme_commands() + conf_commands():
        if command not in seen:
            seen.add(command)
            out.append(command)
    return out


def not_here(command: str) -> str | None:
    return next((why for key, why in NOT_HERE.items() if key in command), None)


# ------------------------------------------------------------------------------------------ the files named


def sandbox_files(folder: Path) -> None:
    """Every file the documented commands name, tiny, with the columns and layout each command expects."""
    rng = random.Random(0)
    rows = make_sentences(60, 0)
    write_csv(folder / "train.csv", [(t, t, lab) for t, lab in rows], header=("text", "sentence", "label"))
    for name, seed in (("dev.csv", 1), ("test.csv", 2), ("new_labelled.csv", 3)):
        write_csv(folder / name, [(t, t, lab) for t, lab in make_sentences(20, seed)], header=("text", "sentence", "label"))
    (folder / "train.txt").write_text("".join(f"{t};{lab}\n" for t, lab in rows))
    (folder / "SMSSpamCollection").write_text("".join(f"{'spam' if lab == 'pos' else 'ham'}\t{t} \"free\n"
                                                      for t, lab in rows))
    (folder / "ag_news").mkdir()
    for name, n in (("train.csv", 60), ("test.csv", 20)):
        lines = [f'"{i % 4 + 1}","{t}","{t[::-1]}"' for i, (t, _) in enumerate(make_sentences(n, 4))]
        (folder / "ag_news" / name).write_text("\n".join(lines) + "\n")
    sick = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\tSemEval_set"]
    for i, (t, _) in enumerate(make_sentences(90, 5)):
        judgment = ["ENTAILMENT", "NEUTRAL", "CONTRADICTION"][i % 3]
        sick.append(f"{i}\t{t}\t{t[::-1]}\t{1 + i % 5}\t{judgment}\t{['TRAIN', 'TRAIN', 'TRIAL', 'TEST'][i % 4]}")
    (folder / "SICK.txt").write_text("\n".join(sick) + "\n")
    write_csv(folder / "tags.csv", multi_label_rows(rng, 60))
    vectors = {name: np.random.default_rng(i).normal(size=(n, 8)).astype(np.float32)
               for i, (name, n) in enumerate((("train", 60), ("dev", 20)))}
    for name, n in (("train", 60), ("dev", 20)):
        labels = [lab for _, lab in make_sentences(n, 0)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"vector": v.tolist(), "label": lab}) + "\n"
                                                      for v, lab in zip(vectors[name], labels)))
    np.save(folder / "train.npy", vectors["train"])
    from safetensors.numpy import save_file

    save_file({"embeddings": vectors["dev"]}, str(folder / "dev.safetensors"))
    write_csv(folder / "pairs.tsv", [(t, t[::-1]) for t, _ in make_sentences(10, 6)], header=("q", "a"))
    (folder / "pairs.tsv").write_text((folder / "pairs.tsv").read_text().replace(",", "\t"))
    shipped_layouts(folder)
    from runner import sample_images

    sample_images.digits(folder)  # pairs.csv, heldout.csv and digits/: the images the README's image commands name
    sample_images.emoji(folder / "emoji")


def shipped_layouts(folder: Path) -> None:
    """The corpora "Files as they come" names, in their shipped layouts: class folders (aclImdb with its unsup
    folder and url lists, 20 Newsgroups with Latin-1 files without extension), one sentence per line in
    Windows-1252 (rt-polaritydata), gzipped JSON lines, a save_to_disk DatasetDict and a lines file."""
    import gzip

    import datasets

    for split, seed in (("train", 7), ("test", 8)):
        for i, (text, label) in enumerate(make_sentences(40, seed)):
            (folder / "aclImdb" / split / label).mkdir(parents=True, exist_ok=True)
            (folder / "aclImdb" / split / label / f"{i}_7.txt").write_text(text + "<br /><br />")
        (folder / "aclImdb" / split / "urls_pos.txt").write_text("http://www.imdb.com/title/tt0000001/usercomments\n")
        (folder / "aclImdb" / split / "labeledBow.feat").write_text("0:9 1:1\n")
        if split == "train":  # unlabelled reviews, left out by data.classes=[neg,pos]
            (folder / "aclImdb" / "train" / "unsup").mkdir()
            (folder / "aclImdb" / "train" / "unsup" / "0_0.txt").write_text("an unlabelled review")
        groups = {"pos": "rec.autos", "neg": "sci.space"}
        for i, (text, label) in enumerate(make_sentences(40, seed)):
            (folder / f"20news-bydate-{split}" / groups[label]).mkdir(parents=True, exist_ok=True)
            body = f"From: r\u00e9mi@example.org\nSubject: {text}\n\n{text} \u00e0 bient\u00f4t\n"
            (folder / f"20news-bydate-{split}" / groups[label] / str(50000 + i)).write_bytes(body.encode("latin-1"))
    (folder / "rt-polaritydata").mkdir()
    for label in ("pos", "neg"):
        lines = [f"{t} \u2014 it\u2019s a caf\u00e9 film" for t, lab in make_sentences(60, 9) if lab == label]
        (folder / "rt-polaritydata" / f"rt-polarity.{label}").write_bytes(("\n".join(lines) + "\n").encode("cp1252"))
    reviews = [json.dumps({"reviewText": t, "overall": 5 if lab == "pos" else 1}) for t, lab in make_sentences(60, 10)]
    (folder / "reviews_train.jsonl.gz").write_bytes(gzip.compress(("\n".join(reviews) + "\n").encode()))
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"text": [t for t, _ in make_sentences(40, seed)], "label": [int(y == "pos") for _, y in make_sentences(40, seed)]},
        features=features) for split, seed in (("train", 11), ("test", 12))}).save_to_disk(str(folder / "imdb"))
    (folder / "reviews.txt").write_text("".join(f"{t}\n\n" for t, _ in make_sentences(10, 13)))


# Hub datasets -> the same data from ../shared/data, for the preset (data=X or an experiment that picks X)
LOCAL = {
    "sst2": ["data.hub=null", "data.text_field=text", "data.train={D}/sst2/train.csv", "data.validation={D}/sst2/dev.csv"],
    "trec": ["data.hub=null", "data.label_field=label", "data.train={D}/trec/train.csv", "data.test={D}/trec/test.csv"],
    "mrpc": ["data.hub=null", "data.train={D}/mrpc/train.csv", "data.validation=null", "data.test={D}/mrpc/test.csv"],
    "stsb": ["data.hub=null", "data.train={D}/stsb/train.csv", "data.validation={D}/stsb/dev.csv",
             "data.test={D}/stsb/test.csv"],
    "snli_pairs": ["data.hub=null", "data.train={D}/snli/pairs_dev.csv", "data.validation=null",
                   "data.test={D}/snli/pairs_test.csv"],
    "snli_triplets": ["data.hub=null", "data.train={D}/snli/triplets_dev.jsonl", "data.validation=null",
                      "data.test={D}/snli/triplets_test.jsonl"],
}
EXPERIMENT_DATA = {"sst2_peft": "sst2", "stsb_bi": "stsb", "trec_kfold_search": "trec"}
TINY_DUAL = {"clip": "tiny_clip", "siglip": "tiny_siglip"}
SHORT = ["train.max_steps=2", "train.eval_at_start=false", "data.max_train_samples=200", "tracking.log_model=false"]


def runnable(command: str, models: dict[str, str]) -> list[str]:
    """The argv that runs ``command`` here: placeholders filled, large models and hub data swapped for tiny
    and local equivalents, training shortened."""
    text = command.replace("$D", str(SHARED_DATA)).replace("../shared/data", str(SHARED_DATA))
    images = any(k in text for k in ("data.type=image", "heldout.csv", "output=onnx_towers"))
    text = text.replace("outputs/runs/<date>/<time>/model", models["image" if images else "single"])
    text = text.replace("runs:/<mlflow run id>", f"runs:/{models['run_id']}")
    args = shlex.split(text)
    if args[:3] == ["python", "-m", "runner"] or args[0] == "runner":
        args = [sys.executable, "-m", "runner", *args[3 if args[0] == "python" else 1:]]
    elif args[:2] == ["python", "-m"]:
        args = [sys.executable, *args[1:]]
    elif args[:2] == ["accelerate", "launch"]:
        args = [str(Path(sys.executable).parent / "accelerate"), *args[1:]]
    tool = args[2] if args[1] == "-m" else args[args.index("-m") + 1]
    if tool in ("runner.predict", "runner.evaluate", "runner.export"):
        model = models["image"] if images else models["pair"] if "pairs" in text else models["single"]
        args = [a.replace("model_dir=DIR", f"model_dir={model}") for a in args]
        if tool != "runner.export":
            args.append(f"tracking_uri={models['uri']}") if "runs:/" in text else None
        return args
    if tool != "runner" or "--help" in args or "-sc" in " ".join(args) or command == "python -m runner":
        return args  # the main job runs as written: the shipped MiniLM on the shipped demo data
    keys = {a.split("=", 1)[0] for a in args if "=" in a}
    out, data, large = [], None, False
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "model" and value in TINY_DUAL:
            arg, large = f"model={TINY_DUAL[value]}", True  # CLIP, SigLIP from the hub: their tiny random twins
        elif key == "model" and value not in ("tiny", "minilm", "lit"):
            arg, large = "model=tiny", True  # e5, bge_small, ...: hub models, unreachable here
        elif key in ("data",) and value in LOCAL:
            data = value
        elif key == "experiment":
            data = EXPERIMENT_DATA.get(value)
        elif key == "hydra.sweeper.n_trials":
            arg = "hydra.sweeper.n_trials=2"
        out.append(arg)
    if data and "data.train" not in keys:  # a hub dataset: the same data from ../shared/data, on the tiny model
        out += [a.format(D=SHARED_DATA) for a in LOCAL[data]]
        if not large and "model" not in keys and "debug" not in keys:
            out.append("model=tiny")
    if any(a.startswith(("hparams_search=", "experiment=trec")) for a in args) and "hydra.sweeper.n_trials" not in keys:
        out.append("hydra.sweeper.n_trials=2")
    k_fold = "cv.folds" in keys or any(a.startswith(("experiment=trec", "hparams_search=")) for a in args)
    out += [a for a in SHORT if a.split("=")[0] not in keys
            and not (k_fold and a.startswith("data.max_train_samples"))]  # the first rows may lack a class's k rows
    return out


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("documented")
    sandbox_files(folder)
    return folder


@pytest.fixture(scope="module")
def models(sandbox) -> dict[str, str]:
    """A LoRA classifier (predict, evaluate, export onnx and merged), a pair bi-encoder and a tiny CLIP on the
    digits, trained by the CLI."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    uri = f"sqlite:///{sandbox / 'trained' / 'mlflow.db'}"
    (sandbox / "trained").mkdir()
    for name, extra in (("single", ["model=tiny", "mode=peft", "data.train=train.csv", "data.validation=dev.csv"]),
                        ("pair", ["model=tiny", "data.train=SICK.txt", "data.type=pair", "data.text_fields=[sentence_A,sentence_B]",
                                  "data.label_field=relatedness_score", "task.target=score", "task.score_range=[1,5]",
                                  "objective.metric=val/spearman", "data.validation_split=0.2"]),
                        ("image", ["model=tiny_clip", "data.type=image_text", "data.train=pairs.csv",
                                   "data.text_field=caption"])):
        done = subprocess.run([sys.executable, "-m", "runner", "data=csv", *extra, "train.max_steps=4",
                               f"hydra.run.dir={sandbox / 'trained' / name}", f"tracking.uri={uri}"],
                              cwd=sandbox, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    run_id = json.loads((sandbox / "trained" / "single" / "mlflow_run.json").read_text())["run_id"]
    return {"single": str(sandbox / "trained" / "single" / "model"), "pair": str(sandbox / "trained" / "pair" / "model"),
            "image": str(sandbox / "trained" / "image" / "model"), "run_id": run_id, "uri": uri}


def test_the_documented_commands_are_found():
    commands = documented()
    assert len(commands) >= 40
    assert "python -m runner" in commands and "python -m runner experiment=trec_kfold_search" in commands
    assert any(c.startswith("python -m runner.export") for c in commands)
    assert not [c for c in commands if "..." in c], "a documented command that cannot run as written"


@pytest.mark.slow
@pytest.mark.parametrize("command", documented())
def test_a_documented_command_runs_as_written(command, sandbox, models, tmp_path):
    why = not_here(command)
    if why:
        pytest.skip(f"not on this machine: {why}")
    if ("$D" in command or "shared/data" in command or "data=" in command or "experiment=" in command) \
            and not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent: hub datasets are replaced by its local copies")
    cwd = tmp_path / "here"
    shutil.copytree(sandbox, cwd, ignore=shutil.ignore_patterns("trained"))
    if command.startswith("eval "):  # shell completion: the script it installs is printed by this command
        args = [sys.executable, "-m", "runner", "-sc", "install=bash"]
    else:
        args = runnable(command, models)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{command}\n-> {shlex.join(args)}\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
