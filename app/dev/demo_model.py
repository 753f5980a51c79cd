"""A tiny, randomly initialised causal LM built on the spot: for tests and the cpu-demo
preset, which must run real engines on a machine with no GPU and no network.

Nothing is downloaded: the tokenizer is trained here with the ``tokenizers`` library on a
small in-memory corpus and the weights come from ``torch.manual_seed``. The result is a
normal Hugging Face model directory (``config.json``, ``model.safetensors``, tokenizer
files with a chat template) that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load like any other.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

# torch and transformers are imported where a model is built: they take seconds to
# import (and to unload at exit), which `demo_llm_is_built` must not cost.
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

# Role markers are special tokens so the pre-tokenizer never splits them.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} {{ eos_token }} "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a small model answers every question with random words",
    "hello world this is a test of the streaming server",
    "engines start on shared gpu hosts and serve requests",
    "say hello to the control plane and its workers",
    "one two three four five six seven eight nine ten",
    "red green blue yellow orange purple black white",
    "cats dogs birds fish horses cows sheep goats",
]


def _build_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Word-level vocabulary, whitespace split, decoded by joining words with spaces, so
    # random generations are space-separated words and stream word by word.
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    # Many distinct words make a vocabulary of a few hundred tokens.
    corpus = _CORPUS + [" ".join(f"{w}{i}" for w in ("alpha", "beta", "gamma")) for i in range(100)]
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS)
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )


def build_tiny_llm(path: Path) -> Path:
    """Create a deterministic tiny Llama-style causal LM and its tokenizer in ``path``.

    Two layers, hidden size 64, a word-level vocabulary of a few hundred tokens and a
    256-token context; builds in well under a second. Returns ``path``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def demo_llm_is_built(path: Path) -> bool:
    """A complete tiny model is at ``path`` (``ensure_demo_llm`` moves it there whole)."""
    return (path / "config.json").exists() and (path / "tokenizer_config.json").exists()


def ensure_demo_llm(path: Path) -> Path:
    """Build the tiny model at ``path`` unless a complete one is already there.

    Built beside ``path`` and renamed into place: a build cut short (``up`` stopped
    while it builds) leaves no half-written model that looks complete.
    """
    if demo_llm_is_built(path):
        return path
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build_tiny_llm(partial)
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)
    return path


if __name__ == "__main__":  # `python -m app.dev.demo_model PATH`, as `sagellm up` runs it
    ensure_demo_llm(Path(sys.argv[1]))
