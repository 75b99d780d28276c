"""A tiny synthetic collection shared by the data and synthetic tests (generated once per session)."""

import shutil

import pytest

from kdcnet.synthetic import make_synthetic

# Small enough to generate in well under a second; videos of 10..40 frames read with max_frames=16
# exercise bin-averaging, 2..12 filler tokens read with max_tokens=8 exercise truncation, and a
# teacher with 0.7 frames per student frame exercises the grid mapping.
TINY = dict(videos=12, val_fraction=0.25, test_fraction=0.25, min_frames=10, max_frames=40, min_captions=2,
            max_captions=4, visual_dim=24, text_dim=16, teacher_dim=8, latent_dim=8, vocab_size=16,
            min_filler=2, max_filler=12, teacher_frame_ratio=0.7)
TINY_READ = dict(max_frames=16, max_tokens=8)
NAME = "tiny"


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Prepared caches (kdcnet.prepared) and generated collections go to a temporary folder, never
    to the user's ~/.cache (subprocesses inherit it)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("KDC_CACHE_DIR", str(tmp_path_factory.mktemp("kdc-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data"), NAME, seed=3, **TINY)


@pytest.fixture
def tiny_copy(tiny_root, tmp_path):
    """A private copy of the tiny collection, free to corrupt."""
    shutil.copytree(tiny_root / NAME, tmp_path / NAME)
    return tmp_path
