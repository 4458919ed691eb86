"""Config of `python -m leader_jax.model_card` (writes RUN/model_card.md for a student or teacher run)."""
from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.run_dir = ""            # a student or teacher run folder
    c.evaluate = True         # score predictions/<split>.npz in-process (the eval CLI's evaluate_run, no
    #                           plots) when RUN/eval/<split>.json is missing; False: say "run the eval CLI"
    c.splits = ("val", "test")
    return c
