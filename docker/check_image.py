"""``nox -s image``: build the image as a user would and check it (Podman; installs what it needs on Debian).

1. podman, runc, mmdebstrap (apt) and podman-compose (pip) when missing;
2. a minimal Debian base with mmdebstrap (this machine reaches no image registry), passed as ``BASE``;
3. the wheels with ``pip download`` into ``.wheels``, passed as ``WHEELS``; the build runs with no network;
4. the image: its size (``image size: <N> MB``), ``--help``, a bad override (exit 1, the host's one-line error),
   a non-root user, no ``.git``/pip cache/credentials in it (listed);
5. ``debug=smoke``, then the offline MiniLM default job inside it against the same job on the host (val accuracy
   within 0.005); SIGTERM to a training container (exit 143, checkpointed) and the same command again on the same
   volume (it resumes);
6. docker/compose.yaml: the tracking server healthy, the train job and 2 sweep workers finished, FINISHED runs and
   none RUNNING in the server's store, the serve service answering a prediction.

    python docker/check_image.py [--keep]   (nox -s image runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE, BASE = "localhost/runner:latest", "localhost/runner-base:bookworm"
PROJECT = "runnercheck"
LIMIT_MB = 1500


def sh(*args: str, check: bool = True, capture: bool = False, env: dict | None = None, timeout: float | None = None,
       cwd: Path = ROOT) -> subprocess.CompletedProcess:
    print("+", " ".join(args), flush=True)
    out = subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, text=True, timeout=timeout,
                         capture_output=capture)
    if check and out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(args)}\n{(out.stdout or '')[-3000:]}\n{(out.stderr or '')[-3000:]}")
    return out


def podman(*args: str, **kw) -> subprocess.CompletedProcess:
    # runc: this Debian's crun cannot set the rlimits a VM without CAP_SYS_RESOURCE refuses (with the conf below)
    runtime = ["--runtime", "runc"] if args[0] in ("run", "build", "create") else []
    return sh("podman", args[0], *runtime, *args[1:], **kw)


def install() -> None:
    missing = [tool for tool in ("podman", "mmdebstrap", "runc") if not shutil.which(tool)]
    if missing:
        sh("apt-get", "update")
        sh("apt-get", "install", "-y", "--no-install-recommends", "podman", "runc", "mmdebstrap", "netavark",
           "aardvark-dns", "uidmap", "ca-certificates")
    if not shutil.which("podman-compose"):
        sh(sys.executable, "-m", "pip", "install", "podman-compose>=1.2")
    conf = ROOT / ".image" / "containers.conf"
    conf.parent.mkdir(exist_ok=True)
    # no default ulimits: on VMs where raising RLIMIT_NOFILE/NPROC is not permitted, the runtime fails otherwise
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    os.environ["CONTAINERS_CONF"] = str(conf)


def base() -> None:
    tar = ROOT / ".image" / "base.tar"
    if not tar.exists():
        excludes = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("man", "doc", "locale", "info")]
        sh("mmdebstrap", "--variant=minbase", "--include=ca-certificates,python3,python3-venv,binutils", *excludes,
           "bookworm", str(tar))
    podman("import", str(tar), BASE)


def build() -> int:
    sh(sys.executable, "-m", "pip", "download", "-q", "-d", ".wheels", "torch==2.13.0", ".[cluster]", "setuptools>=68")
    podman("build", "--network", "none", "-f", "docker/Dockerfile", "--build-arg", f"BASE={BASE}",
           "--build-arg", "WHEELS=.wheels", "-t", IMAGE, ".")
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE, capture=True).stdout.strip()) / 1e6
    print(f"image size: {size:.0f} MB", flush=True)
    return round(size)


def contents() -> None:
    user = podman("run", "--rm", "--entrypoint", "id", IMAGE, "-u", capture=True).stdout.strip()
    print(f"user in the container: uid {user}")
    assert user != "0", "the container runs as root"
    found = podman("run", "--rm", "--entrypoint", "sh", IMAGE, "-c",
                   # installed code is pruned (libraries have modules named credentials.py); the system's CA
                   # bundle is not a secret
                   "find / -xdev \\( -path /proc -o -path '*/site-packages' -o -path /etc/ssl -o -path /usr/lib/ssl "
                   "-o -path /usr/share/ca-certificates \\) -prune -o \\( -name .git -o -name .cache -o -name .netrc "
                   "-o -name .pypirc -o -name '*.pem' -o -name '*.key' -o -name .git-credentials -o -name '.env' "
                   "-o -name credentials -o -name 'credentials.json' -o -name .wheels -o -name '.docker' \\) -print "
                   "2>/dev/null; "
                   "ls -d /root/.cache/pip /home/runner/.cache/pip 2>/dev/null; true", capture=True).stdout.split()
    print(f"'.git', caches, credentials, wheel folders in the image: {found or 'none'}")
    assert not found, found


def cli() -> None:
    out = podman("run", "--rm", IMAGE, "--help", capture=True)
    assert "runner: fine-tune" in out.stdout, out.stdout[:500]
    bad = podman("run", "--rm", IMAGE, "train.lr=-1", check=False, capture=True)
    host = sh(sys.executable, "-m", "runner", "train.lr=-1", check=False, capture=True, cwd=Path(tempfile.mkdtemp()))
    # podman 4.3 with runc hands the container's stderr over on its stdout: the last line of either
    ours, theirs = ((out.stdout + out.stderr).strip().splitlines()[-1] for out in (bad, host))
    print(f"bad override: exit {bad.returncode} in the container, {host.returncode} on the host: {ours}")
    assert bad.returncode == host.returncode == 1 and ours == theirs, (ours, theirs)


def val_accuracy(folder: Path) -> float:
    return json.loads((folder / "metrics.json").read_text())["metrics"]["val/accuracy"]


def jobs(work: Path) -> dict:
    outputs = work / "outputs"
    outputs.mkdir(parents=True)
    outputs.chmod(0o777)  # the container's user (uid 10001) writes here
    mount = ["-v", f"{outputs}:/work/outputs", "-e", "HF_HUB_OFFLINE=1"]
    podman("run", "--rm", *mount, IMAGE, "debug=smoke", "hydra.run.dir=outputs/smoke")
    tic = time.perf_counter()
    podman("run", "--rm", *mount, IMAGE, "hydra.run.dir=outputs/default")
    inside_s = time.perf_counter() - tic
    host_dir = work / "host"
    sh(sys.executable, "-m", "runner", f"hydra.run.dir={host_dir}", "tracking.enabled=false",
       env={"HF_HUB_OFFLINE": "1"}, cwd=work)
    inside, host = val_accuracy(outputs / "default"), val_accuracy(host_dir)
    print(f"default job: val/accuracy {inside:.4f} in the container ({inside_s:.0f} s), {host:.4f} on the host")
    assert abs(inside - host) <= 0.005, (inside, host)

    # SIGTERM: checkpoint and exit 143; the same command on the same volume resumes
    job = ["hydra.run.dir=outputs/stopped", "train.epochs=3", "train.checkpoint_every=5"]
    podman("run", "-d", "--name", f"{PROJECT}-stop", *mount, IMAGE, *job)
    deadline = time.monotonic() + 600
    while not list((outputs / "stopped").glob("checkpoints/*")):
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(2)
    time.sleep(3)
    podman("stop", "-t", "120", f"{PROJECT}-stop")
    code = int(podman("inspect", "--format", "{{.State.ExitCode}}", f"{PROJECT}-stop", capture=True).stdout.strip())
    podman("rm", f"{PROJECT}-stop")
    again = podman("run", "--rm", *mount, IMAGE, *job, capture=True)
    resumed = [line for line in again.stderr.splitlines() + again.stdout.splitlines() if "resuming from" in line]
    print(f"SIGTERM: exit {code}; again on the same volume: {resumed[0].split('] ')[-1] if resumed else 'NOT RESUMED'}")
    assert code == 143 and resumed
    return {"val_accuracy_container": inside, "val_accuracy_host": host, "sigterm_exit": code}


def wait_for(url: str, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            assert time.monotonic() < deadline, f"{what} did not come up within {seconds:.0f} s"
            time.sleep(2)


def compose() -> dict:
    env = {"RUNNER_IMAGE": IMAGE}
    up = ["podman-compose", "-f", "docker/compose.yaml", "-p", PROJECT]
    sh(*up, "down", "-v", check=False, env=env)  # a clean project: the train job refuses a finished run folder
    try:
        sh(*up, "up", "-d", "mlflow", env=env)
        wait_for("http://127.0.0.1:5000/health", 180, "the tracking server")
        sh(*up, "run", "--rm", "train", env=env, timeout=1200)
        sh(*up, "up", "-d", "--scale", "sweep=2", "sweep", env=env)
        names = podman("ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}", "--filter",
                       "label=com.docker.compose.service=sweep", "--format", "{{.Names}}", capture=True).stdout.split()
        podman("wait", *names, timeout=1800)
        workers = podman("ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}", "--filter",
                         "label=com.docker.compose.service=sweep", "--format", "{{.Names}} {{.ExitCode}}", capture=True)
        print("sweep workers:", workers.stdout.strip().replace("\n", "; "))
        codes = [int(line.split()[-1]) for line in workers.stdout.strip().splitlines()]
        assert len(codes) == 2 and codes == [0, 0], workers.stdout
        sh(*up, "up", "-d", "serve", env=env)
        wait_for("http://127.0.0.1:8080/ping", 300, "the serve service")
        request = urllib.request.Request("http://127.0.0.1:8080/invocations", method="POST",
                                         data=json.dumps({"inputs": ["a gripping, beautiful film"]}).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        print("serve answered:", answer)
        import mlflow

        client = mlflow.MlflowClient("http://127.0.0.1:5000")
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], max_results=1000)]
        states = {s: sum(r.info.status == s for r in runs) for s in {r.info.status for r in runs}}
        print("runs in the server's store:", states)
        assert states.get("FINISHED", 0) >= 3 and not states.get("RUNNING"), states
        return {"runs": states, "serve": answer["predictions"][0]}
    finally:
        sh(*up, "down", "-v", check=False, env=env)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-compose", action="store_true")
    parser.add_argument("--skip-build", action="store_true", help="check the image built last time")
    parser.add_argument("--skip-jobs", action="store_true", help="no jobs inside the image (debug=smoke, default, SIGTERM)")
    args = parser.parse_args()
    install()
    if args.skip_build:
        size = round(int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE, capture=True).stdout) / 1e6)
    else:
        base()
        size = build()
    assert size <= LIMIT_MB, f"image size {size} MB is over {LIMIT_MB} MB"
    contents()
    cli()
    work = Path(tempfile.mkdtemp(prefix="image-check-"))
    results = {"image_mb": size, **({} if args.skip_jobs else jobs(work))}
    if not args.skip_compose:
        results |= compose()
    print(json.dumps(results, indent=2))
    print(f"image size: {size} MB")


if __name__ == "__main__":
    main()
