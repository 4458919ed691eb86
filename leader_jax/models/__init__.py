"""Models: the Flax LLaMA, LoRA adapters, the LEADER teacher and student."""
