"""Developer sessions. They run in the current environment (install with the README command first):
a fresh virtualenv per session would re-download torch, and a loose torch spec pulls a CUDA build.

    nox -s tests    the default suite (what CI runs), < 10 minutes on 2 cores
    nox -s slow     real models and data (../shared/data), sweeps: the issues' acceptance figures
    nox -s lint     ruff
    nox -s image    the container image, built with Podman and checked (docker/check_image.py; needs root on Debian)
    nox -s bench    side by side, each contender its own process: fine-tuning against the Hugging Face Trainer,
                    head_only k-fold and runner.predict against SentenceTransformer.encode, peak RSS of a
                    1M-row file, 1 vs 2 CPU processes; writes benchmarks/results.json and the README's
                    performance tables
"""

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]


@nox.session
def tests(session: nox.Session) -> None:
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    session.run("python", "-m", "pytest", "-m", "slow", "-v", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", "runner", "tests", "noxfile.py", "benchmarks")


@nox.session
def image(session: nox.Session) -> None:
    """The container image built as users build it (Podman, a minimal Debian base, a wheel folder, no network)
    and checked: size, CLI, user, contents, jobs inside, SIGTERM and resume, the compose file (docker/check_image.py)."""
    session.run("python", "docker/check_image.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    session.run("python", "benchmarks/bench_train.py", *session.posargs)
    session.run("python", "benchmarks/bench_head_only.py")
    session.run("python", "benchmarks/bench_predict.py", "--backends", "torch,onnx,onnx-int8")
    session.run("python", "benchmarks/bench_serve.py")  # runner.serve vs mlflow models serve, 8 and 32 clients
    session.run("python", "benchmarks/bench_big_file.py")  # 10,000,000-row csv, peak RSS
    session.run("python", "benchmarks/bench_folder.py")  # 100,000 files, one per example, vs sklearn load_files
    session.run("python", "benchmarks/bench_images.py")  # model=lit, 10,000 image files, vs a hand-written loop
    session.run("python", "benchmarks/bench_processes.py")  # 1 vs 2 CPU processes (DDP, gloo)
    session.run("python", "benchmarks/bench_search.py")  # a trial on cached features; pruned vs unpruned search
    session.run("python", "benchmarks/readme_table.py")  # the README's performance tables from results.json
