"""leader_jax: a JAX/Flax reimplementation of LEADER (LLM-distilled medication recommendation).

`leader_jax.Recommender` (trained run → recommendations for new patients) is imported on first use,
so `import leader_jax` stays cheap."""

__version__ = "0.1.0"
__all__ = ["Recommender"]


def __getattr__(name: str):
    if name == "Recommender":
        from leader_jax.recommender import Recommender
        return Recommender
    raise AttributeError(f"module 'leader_jax' has no attribute {name!r}")
