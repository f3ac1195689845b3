"""The Optuna storage of a search, from ``hydra.sweeper.storage``: shared by the sweeper and the trials' pruning.

A module of its own (optuna and the standard library only): the trials find their study through it from
anywhere in the import graph.
"""

from __future__ import annotations

from pathlib import Path


def make_storage(url: str):
    """An Optuna storage object from ``hydra.sweeper.storage``: a journal file or an RDB URL."""
    import optuna

    if url.startswith("journal:"):
        path = Path(url[len("journal:"):].removeprefix("//")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    # pool_pre_ping: a worker that sat through a long trial finds its pooled connection dropped by the server
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
