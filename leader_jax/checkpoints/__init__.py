"""Checkpoint I/O: Hugging Face safetensors import/export."""
