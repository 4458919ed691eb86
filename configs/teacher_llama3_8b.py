"""LEADER(T) on LLaMA-3-8B (HF folder, GQA 32/8 heads, llama3 rope, vocab 128256): the paper's LoRA and
optimiser settings (configs/teacher_llama7b.py) with the LLaMA-3 base. The tokenizer comes from the model
folder (AutoTokenizer, no remote code); it has no pad token, so padding uses id 0 under the attention mask."""
import importlib.util
from pathlib import Path


def _sibling(name):
    """Load another config file of this folder by path (works without `configs` on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"_leader_cfg_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config


_7b = _sibling("teacher_llama7b")


def get_config():
    c = _7b()
    c.config_name = "teacher_llama3_8b"
    c.model.path = ""                     # the Meta-Llama-3-8B HF folder
    return c
