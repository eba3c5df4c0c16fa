"""SmolLM2-135M's shapes, for the benchmarks that build it with random weights (no download).

Hidden 576, intermediate 1536, 30 layers, 9 query / 3 key-value heads of dim 64,
vocabulary 49152, tied embeddings, RoPE base 1e5.
"""

from __future__ import annotations

from jpeft.models import llama


def smollm2_135m(**overrides) -> llama.LlamaConfig:
    """SmolLM2-135M's config; ``overrides`` set other fields (``scan_layers``, ``dtype``, ...)."""
    settings = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, rope_theta=1e5, rms_norm_eps=1e-5,
                    max_position_embeddings=8192, tie_word_embeddings=True)
    return llama.LlamaConfig(**{**settings, **overrides})
