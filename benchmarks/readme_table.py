"""Write the README's performance tables from benchmarks/results.json (between the bench markers).

    python benchmarks/readme_table.py      # nox -s bench runs it last
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT  # noqa: E402

START, END = "<!-- bench:start (benchmarks/readme_table.py writes this part) -->", "<!-- bench:end -->"


def train_table(section: dict) -> list[str]:
    base = section["trainer (grouped)"]["seconds"]
    rows = [f"Full fine-tuning, first {section['rows']:,} SST-2 rows, batch 32, 1 epoch, then one evaluation on "
            f"dev ({section['machine']}):", "",
            "| contender | seconds | samples/s | vs Trainer `group_by_length` | peak RSS | dev acc |", "|---|---|---|---|---|---|"]
    for name, r in section.items():
        if isinstance(r, dict):
            rows.append(f"| {name} | {r['seconds']:.1f} | {r['samples_per_s']:.1f} | {base / r['seconds']:.2f}x | "
                        f"{r['peak_rss_mb']:,.0f} MB | {r['accuracy']:.4f} |")
    return rows


def head_only_table(section: dict) -> list[str]:
    st = section["st-encode"]
    rows = [f"head_only k-fold, TREC train (5,452 questions), {section['folds']} folds x {section['epochs']} epochs "
            f"({section['machine']}):", "", "| contender | seconds | vs one encode call | peak RSS | cv/val/accuracy_mean |",
            "|---|---|---|---|---|",
            f"| one `SentenceTransformer.encode` pass (whole process / encode call) | {st['seconds']} / {st['encode_seconds']} | 1.00x | "
            f"{st['peak_rss_mb']:,} MB | |"]
    for name in ("runner cold", "runner warm", "runner no cache"):
        r = section[name]
        rows.append(f"| {name} | {r['seconds']} | {r['vs_st_encode_call']:.2f}x | {r['peak_rss_mb']:,} MB | "
                    f"{r['cv/val/accuracy_mean']:.4f} |")
    rows += ["", f"Identical fold metrics with and without the cache: {section['identical_fold_metrics']}."]
    return rows


def predict_table(section: dict) -> list[str]:
    st = section["sentence-transformers"]
    rows = [f"Inference, {section['rows']:,} SST-2 sentences to JSONL with embeddings, whole process each "
            f"({section['machine']}):", "", "| contender | seconds | sentences/s | speed-up | peak RSS | min cosine to ST |",
            "|---|---|---|---|---|---|",
            f"| `SentenceTransformer.encode` script | {st['seconds']} | {st['sentences_per_s']} | 1.00x | {st['peak_rss_mb']:,} MB | |"]
    for name, r in section.items():
        if name.startswith("runner.predict"):
            rows.append(f"| `{name}` | {r['seconds']} | {r['sentences_per_s']} | {r['speedup_vs_sentence_transformers']:.2f}x | "
                        f"{r['peak_rss_mb']:,} MB | {r['min_cosine_to_sentence_transformers']:.6f} |")
    if "sst2_dev_accuracy" in section:
        acc, fusion = section["sst2_dev_accuracy"], section["onnx_fusions"]["offline"]
        rows += ["", f"SST-2 dev accuracy of the classifier: {acc['onnx fp32']:.4f} with the fp32 graph, "
                     f"{acc['onnx int8']:.4f} with int8 (measured by `runner.export ... quantize=int8 check=dev.csv`). "
                     f"ONNX Runtime fuses {', '.join(f'{k} x{v}' for k, v in section['onnx_fusions']['session'].items())} "
                     f"at session start; its offline transformer fusion (Attention, SkipLayerNormalization, ...) was "
                     + ("kept" if fusion.get("kept") else f"measured slower here ({fusion.get('ms_per_batch')} ms a batch) and not kept") + "."]
    return rows


def serve_table(section: dict) -> list[str]:
    ours, theirs = section["runner.serve"], section["mlflow models serve"]
    rows = [f"Served under load, loopback, one server at a time ({section['machine']}; {section['model']}): "
            f"`runner.serve` ({ours['backend']}) vs `mlflow models serve` defaults ({theirs['backend']}).", "",
            "| scenario | runner.serve req/s | p50 / p99 ms | mlflow req/s | p50 / p99 ms | throughput | errors (ours / mlflow) |",
            "|---|---|---|---|---|---|---|"]
    for key in [k for k in ours if "clients" in k]:
        a, b = ours[key], theirs[key]
        rows.append(f"| {key} | {a['requests_per_s']} | {a['p50_ms']} / {a['p99_ms']} | {b['requests_per_s']} | "
                    f"{b['p50_ms']} / {b['p99_ms']} | {a['throughput_vs_mlflow']:.2f}x | {a['errors']} / {b['errors']} |")
    rows += ["", f"Peak RSS: {ours['peak_rss_mb']:,} MB (runner.serve) vs {theirs['peak_rss_mb']:,} MB (mlflow, all its "
                 f"processes); start {ours['start_seconds']} s (including the ONNX export) vs {theirs['start_seconds']} s; "
                 f"labels agree on {section['label_agreement']:.1%} of 500 sentences. Malformed requests (status codes, "
                 f"runner.serve / mlflow): " + ", ".join(f"{k} {ours['malformed'][k]} / {theirs['malformed'][k]}"
                                                         for k in ours["malformed"] if k != "still answering") + "."]
    return rows


def big_file_table(section: dict) -> list[str]:
    return [f"A generated {section['rows']:,}-row csv ({section['file_mb']:,} MB), `mode=head_only train.max_steps=100`: "
            f"peak RSS {section['peak_rss_mb']:,} MB, {section['seconds']} s ({section['machine']})."]


def folder_table(section: dict) -> list[str]:
    return [f"A generated folder-per-class corpus of {section['files']:,} small files (`data.train=<folder>`): read in "
            f"{section['runner_read_s']} s vs {section['sklearn_load_files_s']} s for scikit-learn's `load_files` on the "
            f"same folder, side by side ({section['runner_vs_load_files']:.2f}x); the whole `model=tiny mode=head_only "
            f"train.epochs=1` job {section['job_seconds']} s, peak RSS {section['job_peak_rss_mb']:,} MB "
            f"({section['machine']})."]


def search_table(section: dict) -> list[str]:
    rows = []
    names = {"trec": "full fine-tuning, 3-fold CV on 1,000 TREC rows, 12 TPE trials, lr 1e-6..1e-3",
             "sst2": "full fine-tuning, 1,000 SST-2 rows (dev: SST-2 dev), 10 TPE trials of 2 epochs, evaluation every 8 steps"}
    if any(k in section for k in names):
        rows += [f"The same search without a pruner (`hydra.sweeper.pruner=null`) and with the preset's (the top quarter "
                 f"of the finished trials after the first fold or second evaluation, from the second trial on), fixed "
                 f"sampler seed ({section['machine']}):", "",
                 "| search | contender | seconds | vs unpruned | trials pruned | trainings run / saved | best |",
                 "|---|---|---|---|---|---|---|"]
        for key, title in names.items():
            if key not in section:
                continue
            base = section[key]["unpruned"]["seconds"]
            for name in ("unpruned", "pruned"):
                if name not in section[key]:
                    continue
                r = section[key][name]
                label = {"pruned": "pruned (preset)"}.get(name, name)
                rows.append(f"| {title} | {label} | {r['seconds']:.0f} | {r['seconds'] / base:.2f}x | "
                            f"{r.get('sweep/trials_pruned', 0):.0f} | {r.get('sweep/trainings_run', 0):,.0f} / "
                            f"{r.get('sweep/trainings_saved', 0):,.0f} | {r['best']:.4f} |")
        rows.append("")
        rows.append("Trainings: folds (k-fold) or optimizer steps (single split).")
        rows.append("")
    if "cached" in section:
        r = section["cached"]
        rows.append(f"`experiment=trec_kfold_search cv.folds={r['folds']}`, {r['trials']} trials on cached MiniLM features "
                    f"(20 epochs a fold): {r['seconds']:.0f} s in all, {r['seconds_per_trial']:.2f} s a trial "
                    f"(`sweep/seconds_per_trial` {r.get('sweep/seconds_per_trial', float('nan')):.2f} s), best cv accuracy "
                    f"{r['best']:.4f}, peak RSS {r['peak_rss_mb']:,} MB ({section['machine']}).")
    return rows


def images_table(section: dict) -> list[str]:
    pre, train = section["preprocessing"], section["training"]
    runner, hand = train["runner"], train["by_hand"]
    return [f"`model=lit` with {section['images_on_disk']:,} PNG files on disk (64x64, captioned digits), fp32, 1 epoch, "
            f"{section['machine']}:", "",
            "| contender | preprocessing images/s | training images/s | vs by hand | whole process | peak RSS |",
            "|---|---|---|---|---|---|",
            f"| runner (`hardware.num_workers=2`) | {pre['runner_images_per_s']:,} | {runner['train_images_per_s']:,} | "
            f"{train['train_speed_ratio']:.2f}x | {runner['seconds']} s | {runner['peak_rss_mb']:,} MB |",
            f"| hand-written loop (per-example transform, 2 workers) | {pre['by_hand_images_per_s']:,} | "
            f"{hand['train_images_per_s']:,} | 1.00x | {hand['seconds']} s | {hand['peak_rss_mb']:,} MB |", "",
            f"Preprocessing: {pre['images']:,} files, one processor call per batch vs one per image ({pre['speedup']:.2f}x); "
            f"the runner's process also evaluates (step 0 and the end, 1,000 validation images), saves and tracks. "
            f"Validation i2t recall@1 after the epoch: {runner['val_i2t_recall_at_1']:.3f}."]


TABLES = {"train_fp32": train_table, "train_bf16": train_table, "head_only": head_only_table, "predict": predict_table,
          "serve": serve_table, "big_file": big_file_table, "folder": folder_table, "search": search_table, "images": images_table}


def main() -> None:
    results = json.loads(RESULTS.read_text())
    parts = [START, ""]
    for key, render in TABLES.items():
        if key in results:
            parts += [*render(results[key]), ""]
    parts.append(END)
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text:
        raise SystemExit(f"README.md has no {START!r} marker")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    readme.write_text(before + "\n".join(parts) + after)


if __name__ == "__main__":
    main()
