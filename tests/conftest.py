"""Shared fixtures: the real Psych-201 data and tokenizers trained locally on it."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

from psych201_jax.testing import tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The trimmed real corpus vendored in the repository (tools/build_test_corpus.py); PSYCH201_DATA may
# point at another one laid out the same way (e.g. the full corpus, for benchmarks).
VENDORED_DATA = os.path.join(REPO, "tests", "data", "psych201")
DATA_ROOT = os.environ.get("PSYCH201_DATA") or VENDORED_DATA

TOKENIZER_STUDIES = tiny_tokenizer.TOKENIZER_STUDIES


@pytest.fixture(scope="session")
def data_root():
    if not os.path.isdir(DATA_ROOT):
        where = "PSYCH201_DATA" if DATA_ROOT != VENDORED_DATA else "the vendored corpus"
        pytest.fail(
            f"Psych-201 data not found at {DATA_ROOT} ({where}); rebuild it with python -m tools.build_test_corpus"
        )
    return os.path.abspath(DATA_ROOT)


@pytest.fixture(scope="session")
def _tokenizer_texts(data_root):
    return tiny_tokenizer.sample_texts(data_root, TOKENIZER_STUDIES, per_study=30)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory, _tokenizer_texts):
    """Byte-level BPE (4096 tokens), no BOS, ChatML template with enable_thinking."""
    return tiny_tokenizer.train_tokenizer_dir(
        _tokenizer_texts, str(tmp_path_factory.mktemp("tok_qwen")), flavour="qwen"
    )


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory, _tokenizer_texts):
    """Byte-level BPE (4096 tokens) that adds BOS, Llama-3 style template that also emits BOS."""
    return tiny_tokenizer.train_tokenizer_dir(
        _tokenizer_texts, str(tmp_path_factory.mktemp("tok_llama")), flavour="llama"
    )


# The longest test files first: with `-n 2 --dist loadfile` each file is one unit of work handed out in
# collection order, so a long file started last would leave the other worker idle at the end.
SLOW_FILES = (
    "test_parity.py",
    "test_benchmark_smoke.py",
    "test_device_check.py",
    "test_sharding.py",
    "test_simulate.py",
    "test_sampling.py",
    "test_moe_sharding.py",
    "test_sampling_mesh.py",
    "test_sampling_checks.py",
    "test_options.py",
    "test_audit.py",
    "test_sweep.py",
    "test_multiprocess.py",
    "test_resume.py",
    "test_study_oracle.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: the order within a file is kept
