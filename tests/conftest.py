"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def snapshot():
    """`snapshot(folder)`: every file below `folder` with its bytes and mtime, to prove nothing changed.

    The folder lock's files are left out: a writer that takes the lock and is then refused (or
    fails) has still opened them, and they hold no data.
    """
    from tinylm.locks import LOCK_NAME, OWNER_NAME

    def take(folder: Path) -> dict[str, tuple[bytes, int]]:
        return {
            str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(Path(folder).rglob("*")) if path.is_file() and path.name not in (LOCK_NAME, OWNER_NAME)
        }

    return take


def one_thread():
    """One intra-op thread for tests that train tiny models in process: on a busy 2-core machine two
    threads spent most of each step waiting for each other (a step took ~25x longer)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


one_torch_thread = pytest.fixture(one_thread, name="one_torch_thread")
# The same for a whole module, its module-scoped fixtures (a shared run, a pretrained base) included.
one_torch_thread_per_module = pytest.fixture(one_thread, scope="module", name="one_torch_thread_per_module")


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (device, precision); reset it after a test that
    builds Trainers in process, so the next one can pick its own. accelerate's tests do the same."""
    from tinylm.compat import reset_accelerate_state

    yield
    reset_accelerate_state()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A tiny char corpus prepared once (bin) for the tests that train; treat it as read-only."""
    from training_helpers import make_corpus, prepare

    root = tmp_path_factory.mktemp("prepared")
    prepare(make_corpus(root / "corpus.txt"), root / "data")
    return root / "data"
