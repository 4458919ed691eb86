"""LEADER(T) on LLaMA-3-8B (HF folder, GQA 32/8 heads, llama3 rope, vocab 128256): the paper's LoRA and
optimiser settings (configs/teacher_llama7b.py) with the LLaMA-3 base. The tokenizer comes from the model
folder (AutoTokenizer, no remote code); it has no pad token, so padding uses id 0 under the attention mask."""
from leader_jax.cli import load_config


def _7b():
    return load_config("teacher_llama7b.py")


def get_config():
    c = _7b()
    c.config_name = "teacher_llama3_8b"
    c.model.path = ""                     # the Meta-Llama-3-8B HF folder
    return c
