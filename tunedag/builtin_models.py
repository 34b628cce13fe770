"""The built-in models' names and shapes (``base_model: builtin:<name>``), as plain data.

Torch-free, so that config validation can check a name before any job starts;
:mod:`tunedag.models.builtin` builds the model and tokenizer from these entries.
"""
from __future__ import annotations

BUILTIN_MODELS: dict[str, dict] = {
    # Llama architecture with GQA; ~1.6M parameters: trains in minutes on 2 CPU cores.
    "tiny-llama": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       initializer_range=0.02, tokenizer_vocab=512, seed=0),
}
