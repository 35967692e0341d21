"""A small Llama-architecture language model trained on WikiText-2, cached by what defines it.

Editing needs a model that has learned to carry information along the
sequence (see docs/editing.md); randomly initialised tiny models do not.
:func:`ensure_model` trains one on the CPU (or a larger one on a GPU) and stores it as a standard Hugging Face directory, which
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
load like any other model.

Data: ``wikitext2_test.txt`` and ``wikitext2_valid.txt`` (``paths.wikitext_path``),
lightly detokenised (``" @-@ "`` -> ``"-"``, ``" , "`` -> ``", "`` ...), split into
articles at the top-level ``" = Title = "`` headings. The last
``heldout_fraction`` of the articles (in file order, valid after test) are held
out for perplexity; the rest train a byte-level BPE tokenizer (the
``tokenizers`` library, ``<|endoftext|>`` as the only special token, no BOS) and
the model.

Known facts: a tiny model trained on WikiText alone does not route
information from a subject to the end of a prompt (the optimised target vector
at the subject barely moves the prediction; efficacy stays at 0). Real LLMs
learn that routing from the facts in their pretraining text. To stand in for
it, ``fact_records > 0`` (the "cpu" and "gpu" presets) adds the *true* facts of
the first ``fact_records`` CounterFact records of ``paths.counterfact_path()``
to the training text: ``prompt + ground_truth`` and ``locality_prompt +
locality_ground_truth``, each ``fact_repeats`` times, shuffled, twenty sentences
per document (about a fifth of the training characters for the "cpu" preset).
The edited model then knows some of the facts that CounterFact rewrites, as a
pretrained LLM would; rephrase prompts are never trained on. Held-out
perplexity is measured on WikiText only. ``fact_records=0`` trains on WikiText-2
alone.

Training streams the token sequence in non-overlapping windows of
``seq_len + 1`` tokens, shifted by a random offset and shuffled each epoch with
a generator seeded from ``seed``; weights are initialised after
``torch.manual_seed(seed)``. The same config, seed, data and device type give
the same weights.

Cache: ``paths.cache_dir()/models/<key>``, ``key`` a hash of the config, the
seed, the device type and the SHA-256 of every data file used. A finished directory is
written under a temporary name and renamed, so a present directory is complete; it carries the
model store's marker (``model_sources.MARKER``, source ``{"kind": "train-lm"}``), so
``sphere-fast models`` lists it as a trained model and a damaged one is trained again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .._validation import check_positive_int
from ..editing import paths
from ..files import file_sha256
from .model_sources import TRAIN_LM_FILES, TRAIN_LM_SOURCE, entry_is_complete, read_marker, write_marker, \
    write_model_folder

FORMAT_VERSION = 1
EOS = "<|endoftext|>"
MODEL_SUBDIR = "models"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (besides the data and device type)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 450
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    heldout_fraction: float = 0.05
    max_chars: int | None = None  # cap on the training text (tests); None = all
    fact_records: int = 0  # CounterFact records whose true facts join the training text (see module doc)
    fact_repeats: int = 6  # how often each fact sentence occurs
    seed: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "seq_len",
                     "batch_size", "steps"):
            check_positive_int(getattr(self, name), name)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (256 bytes + merges + special), got {self.vocab_size}")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction must be in (0, 0.5), got {self.heldout_fraction}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("fact_records", "fact_repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


PRESETS = {
    # ~7.1M parameters, 6 layers (4 layers route too little from the subject to the
    # prompt's end for edits to take).
    "cpu": TrainConfig(num_layers=6, steps=600, fact_records=1000),
    # ~40M parameters.
    "gpu": TrainConfig(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048,
                       seq_len=256, batch_size=32, steps=3000, lr=1e-3, warmup_steps=200, fact_records=5000),
    # Seconds: for tests.
    "tiny": TrainConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                        seq_len=32, batch_size=4, steps=6, warmup_steps=2, max_chars=20_000),
}


def default_config(device: str | torch.device | None = None) -> TrainConfig:
    """The "gpu" preset on a CUDA device, else the "cpu" preset."""
    dev = torch.device(device) if device is not None else _auto_device()
    return PRESETS["gpu" if dev.type == "cuda" else "cpu"]


def _auto_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- text


def data_files(cfg: "TrainConfig | None" = None) -> list[Path]:
    """The WikiText-2 files, plus the CounterFact file when ``cfg.fact_records`` > 0."""
    files = [paths.wikitext_path("test"), paths.wikitext_path("valid")]
    if cfg is not None and cfg.fact_records:
        files.append(paths.counterfact_path())
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"training text not found: {', '.join(missing)} (set SPHERE_FAST_DATA_DIR to the data folder"
            + (", or set fact_records=0 to train on WikiText-2 alone)" if cfg is not None and cfg.fact_records else ")")
        )
    return files


_DETOK = [
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
    (" : ", ": "), (" 's ", "'s "), (" n't ", "n't "), ("( ", "("), (" )", ")"), (" ' ", "' "),
]
_HEADING = re.compile(r"^((?:= )+)(.*?)((?: =)+)$")  # "= Title =", "= = Section = =" ...


def detokenize(line: str) -> str:
    """Undo WikiText's tokenisation spacing well enough for prompts written in ordinary English."""
    line = line.strip()
    for a, b in _DETOK:
        line = line.replace(a, b)
    if line.endswith(" ."):
        line = line[:-2] + "."
    return line


def articles(files: Sequence[Path]) -> list[str]:
    """WikiText articles (split at top-level headings), detokenised, in file order."""
    out: list[list[str]] = []
    for path in files:
        for raw in path.read_text(encoding="utf-8-sig").splitlines():
            if not raw.strip():
                continue
            m = _HEADING.match(raw.strip())
            if m and m.group(1) == "= " and m.group(3) == " =":
                out.append([detokenize(m.group(2))])
                continue
            if not out:
                out.append([])
            out[-1].append(detokenize(m.group(2)) if m else detokenize(raw))
    return ["\n".join(lines) for lines in out if lines]


def split_articles(docs: list[str], heldout_fraction: float, max_chars: int | None) -> tuple[list[str], list[str]]:
    n_held = max(1, int(round(len(docs) * heldout_fraction)))
    train, held = docs[:-n_held], docs[-n_held:]
    if max_chars is not None:
        kept, size = [], 0
        for d in train:
            if size >= max_chars:
                break
            kept.append(d[: max_chars - size])
            size += len(kept[-1])
        train = kept
        held = [d[: max(1000, max_chars // 10)] for d in held[:2]]
    return train, held


def fact_documents(path: Path, n_records: int, repeats: int, seed: int) -> list[str]:
    """Short documents stating the true facts of the first ``n_records`` CounterFact records.

    Each record gives two sentences, ``prompt + " " + ground_truth + "."`` and
    ``locality_prompt + " " + locality_ground_truth + "."`` (the rephrase prompts
    are left out, so generalisation is measured on unseen wording). Every
    sentence occurs ``repeats`` times; all are shuffled with ``seed`` and packed
    twenty to a document.
    """
    import random

    records = json.loads(path.read_text(encoding="utf-8"))[:n_records]
    sentences = []
    for i, rec in enumerate(records):
        try:
            sentences.append(f"{rec['prompt']} {rec['ground_truth']}.")
            sentences.append(f"{rec['locality_prompt']} {rec['locality_ground_truth']}.")
        except (KeyError, TypeError):
            raise ValueError(f"{path}: record {i} is not in EasyEdit's flat CounterFact schema "
                             "(prompt, ground_truth, locality_prompt, locality_ground_truth)") from None
    pool = sentences * repeats
    random.Random(seed).shuffle(pool)
    return [" ".join(pool[i:i + 20]) for i in range(0, len(pool), 20)]


def training_text(cfg: TrainConfig) -> tuple[list[str], list[str], list[Path]]:
    """(training documents, held-out WikiText documents, the files they came from)."""
    files = data_files(cfg)
    train_docs, held_docs = split_articles(articles(files[:2]), cfg.heldout_fraction, cfg.max_chars)
    if cfg.fact_records:
        train_docs = train_docs + fact_documents(files[2], cfg.fact_records, cfg.fact_repeats, cfg.seed)
    return train_docs, held_docs, files


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer as a ``PreTrainedTokenizerFast`` (EOS/pad ``<|endoftext|>``, no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=None, bos_token=None,
        model_max_length=1 << 20, clean_up_tokenization_spaces=False,
    )


def token_stream(tokenizer, docs: Sequence[str]) -> torch.Tensor:
    """All documents' ids, each followed by EOS, as one 1-D long tensor."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless [batch, seq_len + 1] windows: a random offset and a shuffled order each epoch."""
    width = cfg.seq_len + 1
    if stream.numel() < width * cfg.batch_size + cfg.seq_len:
        raise ValueError(
            f"training text has {stream.numel()} tokens, too few for batch_size={cfg.batch_size} x seq_len={cfg.seq_len}"
        )
    while True:
        offset = int(torch.randint(0, cfg.seq_len, (1,), generator=generator))
        n = (stream.numel() - offset) // width
        windows = stream[offset:offset + n * width].view(n, width)
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):
            yield windows[order[start:start + cfg.batch_size]]


# --------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(2048, 4 * cfg.seq_len),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int, *, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``stream``."""
    device = model.get_input_embeddings().weight.device
    width = seq_len + 1
    n = stream.numel() // width
    if n == 0:
        raise ValueError(f"held-out text has {stream.numel()} tokens, fewer than one window of {width}")
    windows = stream[: n * width].view(n, width)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        chunk = windows[start:start + batch_size].to(device)
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# --------------------------------------------------------------------------- cache


def cache_key(cfg: TrainConfig, device_type: str, files: Sequence[Path] | None = None) -> str:
    files = data_files(cfg) if files is None else files
    blob = json.dumps(
        {"format": FORMAT_VERSION, "config": dataclasses.asdict(cfg), "device": device_type,
         "data": [file_sha256(f) for f in files]},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def model_dir(cfg: TrainConfig, device: str | torch.device | None = None) -> Path:
    dev = torch.device(device) if device is not None else _auto_device()
    return paths.cache_dir() / MODEL_SUBDIR / f"llama-h{cfg.hidden_size}-l{cfg.num_layers}-{cache_key(cfg, dev.type)}"


def is_complete(path: Path) -> bool:
    if read_marker(path) is not None:
        return entry_is_complete(path, TRAIN_LM_SOURCE)
    return all((path / name).exists() for name in TRAIN_LM_FILES)  # trained before the marker was written


def load_info(path: str | Path) -> dict:
    return json.loads((Path(path) / "train_info.json").read_text())


# --------------------------------------------------------------------------- train


def train(
    cfg: TrainConfig, out_dir: str | Path, *, device: str | torch.device | None = None, progress: bool = True,
    overwrite: bool = True,
) -> dict:
    """Train tokenizer and model per ``cfg`` and write a Hugging Face directory to ``out_dir``.

    ``out_dir`` is written under a temporary name beside it and renamed at the
    end. Returns the training info (also in ``out_dir/train_info.json``).
    """
    from tqdm.auto import tqdm

    dev = torch.device(device) if device is not None else _auto_device()
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    train_docs, held_docs, files = training_text(cfg)
    tokenizer = train_tokenizer(train_docs, cfg.vocab_size)
    train_ids = token_stream(tokenizer, train_docs)
    held_ids = token_stream(tokenizer, held_docs)
    t_tok = time.perf_counter() - t0

    model = build_model(cfg, tokenizer).to(dev)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    data = batches(train_ids, cfg, gen)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="train-lm", disable=not progress, unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        batch = next(data).to(dev)
        with autocast:
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    t_train = time.perf_counter() - t0 - t_tok
    ppl = perplexity(model, held_ids, cfg.seq_len)
    info = {
        "format": FORMAT_VERSION,
        "config": dataclasses.asdict(cfg),
        "device": dev.type,
        "data": {str(f.name): file_sha256(f) for f in files},
        "train_tokens": int(train_ids.numel()),
        "heldout_tokens": int(held_ids.numel()),
        "heldout_articles": len(held_docs),
        "heldout_perplexity": ppl,
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": {"tokenizer_and_data": t_tok, "train": t_train, "total": time.perf_counter() - t0},
        "loss_curve": losses[:: max(1, len(losses) // 100)],
    }
    _save(model.to("cpu").float(), tokenizer, info, out_dir, overwrite=overwrite)
    return info


def _save(model, tokenizer, info: dict, out_dir: Path, *, overwrite: bool = False) -> None:
    # An existing complete folder is kept unless overwrite: another process finished first, same inputs, same model.
    def finish(tmp: Path) -> None:
        (tmp / "train_info.json").write_text(json.dumps(info, indent=2))
        write_marker(tmp, TRAIN_LM_SOURCE, {"model_type": model.config.model_type})  # last: the entry is complete

    write_model_folder(model, tokenizer, out_dir, finish=finish, keep_existing=lambda d: is_complete(d) and not overwrite)


def ensure_model(
    cfg: TrainConfig | None = None, *, device: str | torch.device | None = None, progress: bool = True, force: bool = False
) -> tuple[Path, dict, bool]:
    """The cached model directory for ``cfg`` (trained now if absent or ``force``).

    Returns ``(path, train_info, reused)``.
    """
    dev = torch.device(device) if device is not None else _auto_device()
    cfg = cfg or default_config(dev)
    path = model_dir(cfg, dev)
    if is_complete(path) and not force:
        return path, load_info(path), True
    info = train(cfg, path, device=dev, progress=progress, overwrite=force)
    return path, info, False
