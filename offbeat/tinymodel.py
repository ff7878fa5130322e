"""A tiny Qwen2-architecture model with a character-level tokenizer, built and saved locally.

No hub is reachable on the machines that test offbeat, so tests, examples and benchmarks build
this model and load it back through the same `AutoModelForCausalLM`/`AutoTokenizer` code path that
loads `Qwen/...` for users. About 1M parameters at the defaults; vocabulary: the 256 bytes and
the chat-role tokens.

Not covered: anything about quality; a warm start comes from `offbeat-trainer sft`.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(path: str | Path) -> None:
    """A byte-level BPE tokenizer with no merges: one token per byte, plus the chat-role tokens.

    It is the Qwen2 tokenizer's own scheme (byte-level BPE), so `AutoTokenizer` loads it as the
    Qwen2 tokenizer does for the real models; without merges every byte is its own token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        additional_special_tokens=SPECIALS[2:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


def build_tiny_model(
    path: str | Path,
    *,
    hidden_size: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 65_536,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised tiny Qwen2 model and its tokenizer to `path`."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    build_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def ensure_tiny_model(path: str | Path, **kwargs: int) -> Path:
    """Build the model at `path` unless a finished one is already there."""
    path = Path(path)
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        build_tiny_model(path, **kwargs)
    return path
