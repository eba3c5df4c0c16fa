"""Checkpoint formats: local Hugging Face folders (safetensors), GGUF files, the PEFT adapter format."""

from jpeft.errors import CheckpointError
from jpeft.io.gguf import load_gguf, load_gguf_tokenizer
from jpeft.io.hf import load_hf, read_hf_config, save_hf

__all__ = ["CheckpointError", "load_gguf", "load_gguf_tokenizer", "load_hf", "read_hf_config", "save_hf"]
