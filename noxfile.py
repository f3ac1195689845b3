"""Developer sessions. They run in the current environment (install with the README command first):
a fresh virtualenv per session would re-download torch, and a loose torch spec pulls a CUDA build.

    nox -s tests    the default suite (what CI runs), < 10 minutes on 2 cores
    nox -s slow     real models and data (../shared/data), sweeps: the issues' acceptance figures
    nox -s lint     ruff
    nox -s bench    throughput and peak memory against the Hugging Face Trainer, and head_only k-fold against
                    one SentenceTransformer.encode pass, side by side
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
def bench(session: nox.Session) -> None:
    session.run("python", "benchmarks/bench_train.py", *session.posargs)
    session.run("python", "benchmarks/bench_head_only.py")
