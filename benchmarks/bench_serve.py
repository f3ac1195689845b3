"""Served under load: ``python -m runner.serve`` against ``mlflow models serve`` (its defaults) on the same model,
over loopback, one server at a time.

    python benchmarks/bench_serve.py [--singles 400] [--batches 64]

The model is the one a default head_only job logs (all-MiniLM-L6-v2 + a classifier head, trained on 2,000 SST-2
sentences): ``mlflow models serve -m runs:/<id>/model --env-manager local`` serves its logged MLflow model as is;
``runner.serve`` serves the run's folder with its defaults (backend=auto: it exports the ONNX graph at start).
Each scenario is bounded: a fixed number of clients (8, then 32), each on its own keep-alive connection, sending
its share of a fixed number of requests (single SST-2 sentences, then batches of 32) back to back; it stops by
itself. Reported: requests/s and texts/s, p50/p99 latency, errors (anything but 200, and timeouts), the server's
peak RSS (its whole process tree, sampled every 50 ms), its start time, and how often its labels agree with the
other server's. Malformed requests (tests/test_serve.py checks each) are sent to both at the end: status codes.
Results go to ``benchmarks/results.json`` under ``serve``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, shared_file, store, timed  # noqa: E402

MALFORMED = {  # name: (body, content type)
    "wrong field": (b'{"dataframe_records": [{"txt": "a film"}]}', "application/json"),
    "number for text": (b'{"dataframe_records": [{"text": 3}]}', "application/json"),
    "truncated JSON": (b'{"dataframe_records": [{"text": ', "application/json"),
    "not UTF-8": (b'{"inputs": ["\xff\xfe"]}', "application/json"),
    "2 MB body": (b'{"inputs": ["' + b"a" * 2_000_000 + b'"]}', "application/json"),
    "no rows": (b'{"dataframe_records": []}', "application/json"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Peak(threading.Thread):
    """Peak RSS (MB) of a process and its children, sampled until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0.0, True
        self.start()

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while self.running:
            try:
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak = max(self.peak, total / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.05)


def post(conn: http.client.HTTPConnection, body: bytes, kind: str = "application/json") -> tuple[int, bytes]:
    conn.request("POST", "/invocations", body=body, headers={"Content-Type": kind})
    response = conn.getresponse()
    return response.status, response.read()


def load(port: int, bodies: list[bytes], clients: int, timeout: float = 120) -> dict:
    """``clients`` threads, each on one connection, share ``bodies`` (fixed, sent back to back)."""
    latencies, errors, lock = [], [0], threading.Lock()
    shares = [bodies[i::clients] for i in range(clients)]

    def client(share: list[bytes]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        for body in share:
            start = time.perf_counter()
            try:
                status, _ = post(conn, body)
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            elapsed = time.perf_counter() - start
            with lock:
                if status == 200:
                    latencies.append(elapsed)
                else:
                    errors[0] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"requests": len(bodies), "seconds": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "errors": errors[0]}


def labels(port: int, texts: list[str]) -> list:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    status, body = post(conn, json.dumps({"dataframe_records": [{"text": t} for t in texts]}).encode())
    assert status == 200, body[:300]
    return [row["label"] for row in json.loads(body)["predictions"]]


def serve(name: str, command: list[str], port: int, texts: list[str], args, work: Path) -> dict:
    log = open(work / f"{name}.log", "w")
    tic = time.perf_counter()
    server = subprocess.Popen(command, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    peak = Peak(server.pid)
    try:
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/ping")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.perf_counter() - tic > 300:
                raise SystemExit(f"{name} did not start:\n{(work / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.2)
        result = {"start_seconds": round(time.perf_counter() - tic, 1)}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/metadata")  # runner.serve says how it runs; mlflow answers 404
        response = conn.getresponse()
        about = json.loads(response.read()) if response.status == 200 else {}
        result["backend"] = f"{about['backend']} ({about['precision']})" if about else "the logged model's pyfunc (torch)"
        singles = [json.dumps({"dataframe_records": [{"text": t}]}).encode() for t in texts[: args.singles]]
        batches = [json.dumps({"dataframe_records": [{"text": t} for t in texts[i * 32:(i + 1) * 32]]}).encode()
                   for i in range(args.batches)]
        load(port, singles[:16], 4)  # warm-up
        for clients in (8, 32):
            result[f"single, {clients} clients"] = load(port, singles, clients)
            batched = load(port, batches, clients)
            batched["texts_per_s"] = round(batched["requests_per_s"] * 32, 1)
            result[f"batch of 32, {clients} clients"] = batched
            print(name, clients, "clients:", result[f"single, {clients} clients"], batched, flush=True)
        result["labels"] = labels(port, texts[:250]) + labels(port, texts[250:500])
        malformed = {}
        for case, (body, kind) in MALFORMED.items():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                malformed[case] = post(conn, body, kind)[0]
            except (OSError, http.client.HTTPException) as err:
                malformed[case] = f"no answer ({type(err).__name__})"
        malformed["still answering"] = len(labels(port, texts[:4])) == 4
        result["malformed"] = malformed
        result["peak_rss_mb"] = round(peak.peak)
        return result
    finally:
        peak.running = False
        os.killpg(server.pid, 15)
        server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--singles", type=int, default=400, help="requests of one text per scenario")
    parser.add_argument("--batches", type=int, default=64, help="requests of 32 texts per scenario")
    args = parser.parse_args()
    import pandas as pd

    frame = pd.read_csv(shared_file("sst2", "train.csv"))
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    frame.iloc[:2000].to_csv(work / "train.csv", index=False)
    texts = frame.iloc[2000:].text.astype(str).tolist()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    timed([sys.executable, "-m", "runner", "mode=head_only", "data=csv", f"data.train={work / 'train.csv'}",
           f"hydra.run.dir={work / 'run'}", f"tracking.uri={uri}", "train.progress=false"], ROOT)
    run_id = json.loads((work / "run" / "mlflow_run.json").read_text())["run_id"]
    results = {"model": "all-MiniLM-L6-v2 + classifier head (head_only, 2,000 SST-2 sentences)", "texts": "SST-2 sentences",
               "cpu_flags": " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
                                     if f in Path("/proc/cpuinfo").read_text().split())}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    port = free_port()
    results["mlflow models serve"] = serve("mlflow", [sys.executable, "-m", "mlflow", "models", "serve", "-m",
                                                      f"runs:/{run_id}/model", "--env-manager", "local", "-h", "127.0.0.1",
                                                      "-p", str(port)], port, texts, args, work) | {"backend": "torch (the logged model)"}
    port = free_port()
    ours = serve("runner", [sys.executable, "-m", "runner.serve", f"model_dir={work / 'run' / 'model'}", f"port={port}"],
                 port, texts, args, work)
    results["runner.serve"] = ours
    a, b = results["mlflow models serve"].pop("labels"), ours.pop("labels")
    results["label_agreement"] = round(float(np.mean([x == y for x, y in zip(a, b)])), 4)
    for key in [k for k in ours if "clients" in k]:
        theirs = results["mlflow models serve"][key]
        ours[key]["throughput_vs_mlflow"] = round(ours[key]["requests_per_s"] / max(theirs["requests_per_s"], 1e-9), 2)
    print(json.dumps(results, indent=2))
    store("serve", results)


if __name__ == "__main__":
    main()
