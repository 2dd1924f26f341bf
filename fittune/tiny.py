"""Build the offline demo's tiny Qwen2-architecture model and its tokenizer, with no network.

The result is written with `save_pretrained` and then loaded back through `from_pretrained`, the same path a
user's real model takes, so the demo and the tests exercise the real loading code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fittune.config import DEMO_DATA, TinyModelConfig

# ChatML, as Qwen2.5 uses it, without Qwen's default system message
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    texts = []
    for line in DEMO_DATA.read_text().splitlines():
        row = json.loads(line)
        texts.append(row["question"])
        texts.append(row["answer"])
    # the chat scaffolding, so role names are single tokens
    texts += ["system", "user", "assistant", "You are a helpful assistant."]
    return texts


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the demo corpus (any text still encodes: it falls back to bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"
    return fast


def tiny_stamp(shape: TinyModelConfig, seed: int) -> dict:
    """What identifies a built tiny model: its shape and seed (the same pair gives the same files)."""
    return {"model": "tiny-qwen2", "shape": shape.model_dump(), "seed": seed}


def write_tiny_model(target: Path, shape: TinyModelConfig, seed: int) -> None:
    """Write the tiny model and its tokenizer into the (empty) directory `target`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer(shape.vocab_size)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=2048,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,  # as in Qwen2.5-3B
        initializer_range=0.1,  # larger than 0.02 so a tiny random model has usable logits (LoRA can move them)
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
    )
    # a private RNG stream: building the model (on the main process, first run only) must not shift the
    # global one, or the LoRA initialisation would depend on whether the cached model already existed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(target)
    tok.save_pretrained(target)
