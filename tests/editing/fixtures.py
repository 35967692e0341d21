"""Tiny in-process models, tokenizers and edit requests for the editing tests.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in-process on
the shared CounterFact and WikiText-2 files, and models are built from
transformers configs with seeded random weights.

    tok = tiny_tokenizer()                       # GPT-2 style, no BOS
    tok = tiny_tokenizer(bos=True)               # Llama style, BOS prepended
    model = tiny_model("llama", tok)             # "llama" | "qwen2" | "mistral" | "gpt2" | "gptj"
    reqs = subject_end_requests(tok, 10)         # prompts that end at the subject, 1-token targets
    reqs = counterfact_requests(5)               # full CounterFact prompts
    top1 = teacher_forced_top1(model, tok, reqs) # fraction of target tokens predicted (argmax)
"""
from __future__ import annotations

import functools
import json

import torch

from sphere_fast.editing import paths
from sphere_fast.editing.requests import EditRequest

ARCHS = ("llama", "qwen2", "mistral", "gpt2", "gptj")
VOCAB_SIZE = 2048


def _require_data(path) -> None:
    """Skip, saying where the data was looked for, when the shared data folder is absent."""
    if not path.exists():
        import pytest

        pytest.skip(f"{path} not found: the shared data folder is absent (set SPHERE_FAST_DATA_DIR)")


def _counterfact_records() -> list[dict]:
    _require_data(paths.counterfact_path())
    with open(paths.counterfact_path(), encoding="utf-8") as fh:
        return json.load(fh)


@functools.lru_cache(maxsize=None)
def _trained_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    records = _counterfact_records()[:4000]
    texts = [r["prompt"] + " " + r["target_new"] + " " + r["ground_truth"] for r in records]
    _require_data(paths.wikitext_path("valid"))
    with open(paths.wikitext_path("valid"), encoding="utf-8") as fh:
        texts += fh.read(300_000).splitlines()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>", "<s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return bpe.to_str()


def tiny_tokenizer(*, bos: bool = False):
    """A fast byte-level BPE tokenizer (vocab 2048); ``bos=True`` prepends ``<s>`` like Llama."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(_trained_bpe())
    if bos:
        raw.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=True),
                processors.TemplateProcessing(
                    single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", raw.token_to_id("<s>"))]
                ),
            ]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|endoftext|>",
        bos_token="<s>",
        pad_token="<pad>",
        padding_side="right",
    )
    return tok


def tiny_model(arch: str = "llama", tokenizer=None, *, hidden: int = 128, intermediate: int = 512,
               layers: int = 4, heads: int = 4, seed: int = 0):
    """A randomly initialised float32 causal LM of the given architecture, in eval mode."""
    import transformers as tf

    vocab = len(tokenizer) if tokenizer is not None else VOCAB_SIZE
    common = dict(vocab_size=vocab, tie_word_embeddings=False, bos_token_id=1, eos_token_id=0, pad_token_id=2)
    if tokenizer is not None:
        common.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    if arch in ("llama", "qwen2", "mistral"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
        config = cls(
            hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256, **common,
        )
    elif arch == "gpt2":
        config = tf.GPT2Config(n_embd=hidden, n_inner=intermediate, n_layer=layers, n_head=heads,
                               n_positions=256, **common)
    elif arch == "gptj":
        config = tf.GPTJConfig(n_embd=hidden, n_inner=intermediate, n_layer=layers, n_head=heads,
                               n_positions=256, rotary_dim=hidden // heads // 2, **common)
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float().eval()


def _single_token(tok, word: str) -> bool:
    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
    return len(ids) == 1


def subject_end_requests(tok, n: int, *, offset: int = 0) -> list[EditRequest]:
    """CounterFact requests cut to end at the subject, with single-token targets.

    A random tiny model cannot carry information past the subject (see
    docs/editing.md), so these are the requests on which efficacy is measurable.
    Subjects are distinct; records are taken in file order from ``offset``.
    """
    out, seen = [], set()
    for rec in _counterfact_records()[offset:]:
        prompt, subject = rec["prompt"], rec["subject"]
        at = prompt.find(subject)
        if at < 0 or subject in seen or not _single_token(tok, rec["target_new"]):
            continue
        template = prompt[:at] + "{}"
        if template.count("{}") != 1 or "{" in prompt[:at] or "}" in prompt[:at]:
            continue
        seen.add(subject)
        out.append(EditRequest(prompt=template, subject=subject, target_new=rec["target_new"],
                               target_true=rec["ground_truth"], case_id=rec["case_id"]))
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} suitable CounterFact records, asked for {n}")


def counterfact_requests(n: int, *, offset: int = 0) -> list[EditRequest]:
    """Full CounterFact requests (prompt continues after the subject, any target length)."""
    out = []
    for rec in _counterfact_records()[offset:]:
        prompt, subject = rec["prompt"], rec["subject"]
        if prompt.count(subject) != 1 or "{" in prompt or "}" in prompt:
            continue
        out.append(EditRequest(
            prompt=prompt.replace(subject, "{}"), subject=subject, target_new=rec["target_new"],
            target_true=rec["ground_truth"], rephrase_prompts=(rec["rephrase_prompt"],),
            neighborhood_prompts=(rec["locality_prompt"],), neighborhood_targets=(rec["locality_ground_truth"],),
            case_id=rec["case_id"],
        ))
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} suitable CounterFact records, asked for {n}")


@torch.no_grad()
def teacher_forced_top1(model, tok, requests, *, prompts=None) -> float:
    """Fraction of target tokens (leading space) that are the argmax after their prefix.

    ``prompts`` overrides each request's filled-in prompt (e.g. a rephrase).
    """
    hits = total = 0
    device = next(model.parameters()).device
    for i, req in enumerate(requests):
        text = prompts[i] if prompts is not None else req.text
        ctx = tok(text)["input_ids"]
        tgt = tok(" " + req.target_new.strip(), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + tgt[:-1]], device=device)
        logits = model(input_ids=ids).logits[0]
        pred = logits[len(ctx) - 1:].argmax(-1).tolist()
        hits += sum(int(p == t) for p, t in zip(pred, tgt))
        total += len(tgt)
    return hits / total
