"""leader_jax: a JAX/Flax reimplementation of LEADER (LLM-distilled medication recommendation)."""

__version__ = "0.1.0"
