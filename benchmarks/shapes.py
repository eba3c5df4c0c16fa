"""Model shapes for the benchmarks that build models with random weights (no download).

SmolLM2-135M: hidden 576, intermediate 1536, 30 layers, 9 query / 3 key-value heads of
dim 64, vocabulary 49152, tied embeddings, RoPE base 1e5. A 1B-parameter Llama (Llama 3.2
1B's published shapes): hidden 2048, intermediate 8192, 16 layers, 32 query / 8 key-value
heads of dim 64, vocabulary 128256, tied embeddings.
"""

from __future__ import annotations

from jpeft.models import llama


def smollm2_135m(**overrides) -> llama.LlamaConfig:
    """SmolLM2-135M's config; ``overrides`` set other fields (``scan_layers``, ``dtype``, ...)."""
    settings = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, rope_theta=1e5, rms_norm_eps=1e-5,
                    max_position_embeddings=8192, tie_word_embeddings=True)
    return llama.LlamaConfig(**{**settings, **overrides})


def llama_1b(**overrides) -> llama.LlamaConfig:
    """A 1.24B-parameter Llama config (Llama 3.2 1B's shapes); ``overrides`` as above."""
    settings = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                    num_kv_heads=8, head_dim=64, rope_theta=5e5, rms_norm_eps=1e-5,
                    max_position_embeddings=8192, tie_word_embeddings=True)
    return llama.LlamaConfig(**{**settings, **overrides})
