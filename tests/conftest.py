"""Test-suite setup: 8 simulated CPU devices, so sharding is tested on one host.

The flag must be set before jax is first imported; pytest imports this file before
any test module. A device count already in ``XLA_FLAGS`` is respected.
"""

import os
import tempfile

_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=8".strip()

# One XLA compilation cache for this test session, its xdist workers and the programs the tests
# start: many tests compile the same tiny train step, and on 2 CPU cores compiling is most of a
# test's time. A fresh folder per session, so no result depends on an earlier run.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jpeft-tests-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Training jobs and benchmarks the tests run write their result records here, not into results/.
os.environ.setdefault("JPEFT_RESULTS_DIR", tempfile.mkdtemp(prefix="jpeft-tests-results-"))

import pytest  # noqa: E402


# ----------------------------------------------------------------------------- shared fixtures (made once)


@pytest.fixture(scope="session")
def bbc_dir():
    """The offline BBC News corpus folder."""
    from jpeft import assets

    return assets.bbc_news_dir()


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, read from the offline GGUF file's metadata."""
    from jpeft import assets
    from jpeft.io.gguf import load_gguf_tokenizer

    return load_gguf_tokenizer(assets.smollm2_gguf_path())


def _tiny_folder(folder, tokenizer, scale: float = 1.0):
    import jax

    from jpeft.io.hf import save_hf
    from jpeft.models import llama

    c = llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    params = llama.model(c).init(jax.random.key(0))
    if scale != 1.0:
        params = jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, params)
    save_hf(folder, llama.model(c), params)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory, tokenizer):
    """A tiny random Llama (2 layers, width 64) with SmolLM2's tokenizer, as a Hugging Face folder."""
    return _tiny_folder(tmp_path_factory.mktemp("tiny_llama"), tokenizer)


@pytest.fixture(scope="session")
def mixing_hf_folder(tmp_path_factory, tokenizer):
    """The tiny Llama with weights 5x the init's 0.02 std: layers that mix tokens enough for a prompt or
    prefix to steer the output (at 0.02 each position's output is mostly its own token's embedding)."""
    return _tiny_folder(tmp_path_factory.mktemp("mixing_llama"), tokenizer, scale=5.0)


def pytest_sessionfinish(session, exitstatus):
    """The session that made the compilation cache removes it (xdist workers leave it to the controller)."""
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only with ``JPEFT_SLOW=1`` (they are skipped, not passed)."""
    if os.environ.get("JPEFT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow check; run with JPEFT_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
