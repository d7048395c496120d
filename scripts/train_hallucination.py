#!/usr/bin/env python
"""Train the hallucination (NLI) classifier with exactly-resumable, cloud-synced checkpoints.

A premise and a hypothesis go in; entailment, neutral or contradiction comes out. Rerunning the same command
after an interruption (a lost Kaggle/Colab session, a preempted cluster job) continues from the newest verified
checkpoint, at the exact batch, with the same optimizer, scheduler, scaler, sampler and RNG state.

    python scripts/train_hallucination.py \\
        --data-dir /kaggle/working/nli_dataset \\
        --checkpoint-dir /kaggle/working/checkpoints \\
        --output-dir /kaggle/working/outputs \\
        --config base_config --epochs 5 --batch-size 8 --gradient-accumulation-steps 8 \\
        --learning-rate 2e-5 --mixed-precision fp16 --model-name bert-base-uncased \\
        --remote s3://my-bucket/runs/nli-1

With ``--demo-data`` it trains a tiny BERT-like model on a generated demo set, offline, on CPU, in about a minute.

Data: ``train.jsonl`` and ``validation.jsonl`` in --data-dir, one JSON object per line with ``premise``,
``hypothesis`` and ``label`` (0/1/2 or "entailment"/"neutral"/"contradiction"). With --demo-data an empty or
missing --data-dir gets a small deterministic demo set written into it; without it, that is an error (exit 2).
Without --model-name the model is the tiny demo model, built locally, and the log says so at the start.

Exit status: 0 on success, 2 with a one-line message on bad input (config, data, checkpoint), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    import syncckpt  # noqa: F401
except ImportError:
    # The script is usually run from an unpacked code archive (Kaggle, Colab) where syncckpt is not installed.
    sys.path.insert(0, str(REPO_ROOT))

from syncckpt._cli_common import parse_storage_options  # noqa: E402
from syncckpt.config import CheckpointingConfig, load_config  # noqa: E402
from syncckpt.errors import SyncCkptError  # noqa: E402
from syncckpt.lifecycle import INTERRUPTED_EVENT  # noqa: E402

log = logging.getLogger("train_hallucination")

LABELS = ("entailment", "neutral", "contradiction")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


# ---- config schema (only the checkpointing section belongs to the library) --------------------------------

_STRICT = ConfigDict(extra="forbid", strict=True, validate_default=True, protected_namespaces=())


class ModelConfig(BaseModel):
    model_config = _STRICT

    name: str | None = Field(None, description="Local path or hub id; null builds the tiny demo model.")
    num_labels: int = Field(3, ge=2)
    max_length: int = Field(64, ge=8)
    hidden_size: int = Field(32, ge=2)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(64, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)


class TrainingConfig(BaseModel):
    model_config = _STRICT

    epochs: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 42
    num_workers: int = Field(0, ge=0)
    eval_batch_size: int = Field(64, ge=1)
    output_dir: str = Field("./outputs", min_length=1)
    max_steps: int | None = Field(
        None, ge=1, description="Stop at this global optimizer step, counted from the run's start (tests, smoke runs)."
    )
    tensorboard: bool = Field(False, description="Scalars under <output_dir>/tensorboard, mirrored with the run.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `no` as false; that is what the user meant.
        return "no" if value is False else value


class DataConfig(BaseModel):
    model_config = _STRICT

    data_dir: str = Field("./data/nli_dataset", min_length=1)
    train_file: str = "train.jsonl"
    validation_file: str = "validation.jsonl"
    demo_data: bool = Field(False, description="Write the demo NLI set into an empty data_dir (else: an error).")
    demo_train_size: int = Field(480, ge=3)
    demo_validation_size: int = Field(120, ge=3)


class TrainConfig(BaseModel):
    """The whole config file: model, training, data and the library's checkpointing section."""

    model_config = _STRICT

    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    checkpointing: CheckpointingConfig = Field(default_factory=CheckpointingConfig)


# ---- command line ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_hallucination.py",
        description="Train the hallucination (NLI) classifier: entailment, neutral or contradiction.",
        epilog="After an interruption, rerun the same command: it resumes from the newest verified checkpoint, "
        "local or remote. Flags override the config file. Exit status 2 means bad input (config, data, checkpoint).",
    )
    p.add_argument(
        "--config", default="base_config", help="config name (config/<name>.yaml) or YAML path (default: base_config)"
    )
    p.add_argument("--data-dir", help="folder with train.jsonl/validation.jsonl")
    p.add_argument(
        "--demo-data",
        action="store_const",
        const=True,
        help="write a small deterministic demo NLI dataset into --data-dir when it is empty or missing",
    )
    p.add_argument("--checkpoint-dir", help="local checkpoint folder (overrides checkpointing.save_dir)")
    p.add_argument("--output-dir", help="where final_model/ is written (overrides training.output_dir)")
    p.add_argument("--model-name", help="local path or hub id of a model to fine-tune; default: tiny demo model")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--gradient-accumulation-steps", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--seed", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument(
        "--max-steps",
        type=int,
        help="stop at this global optimizer step, counted from the start of the run, not of this session (as the "
        "Trainer's max_steps): a run resumed past it stops at once",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="write TensorBoard scalars under <output-dir>/tensorboard, mirrored beside the checkpoints",
    )
    p.add_argument("--remote", help="mirror checkpoints to this URL (overrides checkpointing.remote)")
    p.add_argument("--save-every-n-batches", type=int, help="step checkpoint every N optimizer steps")
    p.add_argument("--save-every-n-minutes", type=float, help="also checkpoint after N minutes without one")
    p.add_argument(
        "--keep-local",
        choices=["all", "newest", "none"],
        help="with --remote, local copies kept once mirrored (overrides checkpointing.keep_local)",
    )
    p.add_argument(
        "--deadline",
        metavar="WHEN",
        help="session deadline: a last checkpoint is taken and mirrored before it, then the run stops (exit 143); "
        "'auto' (Kaggle's and Colab's limits), 'off', a duration from the session start ('11h30m') or a local "
        "date and time ('2025-06-01T18:00') (overrides checkpointing.deadline)",
    )
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume-from", metavar="PATH_OR_URL", help="resume from this checkpoint (folder or remote URL)"
    )
    resume.add_argument(
        "--no-resume", action="store_true", help="start from scratch instead of resuming the newest checkpoint"
    )
    p.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to the --remote store (repeatable; VALUE is JSON-decoded where valid), e.g. "
        '\'client_kwargs={"endpoint_url": "https://ACCOUNT.r2.cloudflarestorage.com"}\'; never logged',
    )
    p.add_argument(
        "--start-fresh-if-damaged",
        action="store_true",
        help="when checkpoints exist but none verifies, train from scratch beside them (they stay quarantined) "
        "instead of exiting with status 2",
    )
    p.add_argument(
        "--takeover",
        action="store_true",
        help="take over the --remote run even if another live session holds its lease (that session's "
        "uploads are then refused)",
    )
    return p


# Flag -> dotted config key. Flags left unset (None) keep the config file's value.
_OVERRIDES = {
    "data_dir": "data.data_dir",
    "demo_data": "data.demo_data",
    "checkpoint_dir": "checkpointing.save_dir",
    "output_dir": "training.output_dir",
    "model_name": "model.name",
    "epochs": "training.epochs",
    "batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "learning_rate": "training.learning_rate",
    "mixed_precision": "training.mixed_precision",
    "seed": "training.seed",
    "num_workers": "training.num_workers",
    "max_steps": "training.max_steps",
    "tensorboard": "training.tensorboard",
    "remote": "checkpointing.remote",
    "save_every_n_batches": "checkpointing.save_every_n_batches",
    "save_every_n_minutes": "checkpointing.save_every_n_minutes",
    "keep_local": "checkpointing.keep_local",
    "deadline": "checkpointing.deadline",
}


# ---- data -----------------------------------------------------------------------------------------------


class InputError(ValueError):
    """Unusable data, model or flag combination; the message names the file, line or flag."""


def read_split(path: Path) -> list[dict[str, Any]]:
    """Read a jsonl split into dicts with premise, hypothesis and an integer label."""
    examples = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                examples.append(_example(row, f"{path}:{lineno}"))
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if not examples:
        raise InputError(f"{path}: holds no examples")
    return examples


def _example(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object with premise, hypothesis and label")
    for key in ("premise", "hypothesis"):
        if not isinstance(row.get(key), str):
            raise InputError(f"{where}: {key!r} is missing or not a string")
    label = row.get("label")
    if isinstance(label, str) and label.lower() in LABELS:
        label = LABELS.index(label.lower())
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(LABELS):
        raise InputError(f"{where}: label {label!r} is not one of 0, 1, 2 or {', '.join(LABELS)}")
    return {"premise": row["premise"], "hypothesis": row["hypothesis"], "label": label}


def prepare_data_dir(cfg: DataConfig) -> tuple[Path, Path]:
    """The train and validation files; writes the demo set when the folder does not exist or is empty and the demo
    set was asked for (a mistyped --data-dir must not train on toy data and exit 0)."""
    data_dir = Path(cfg.data_dir).expanduser()
    if data_dir.exists() and not data_dir.is_dir():
        raise InputError(f"--data-dir {data_dir} is a file, not a folder")
    train, val = data_dir / cfg.train_file, data_dir / cfg.validation_file
    try:
        empty = not data_dir.exists() or not any(data_dir.iterdir())
    except OSError as e:
        raise InputError(f"--data-dir {data_dir}: cannot list the folder ({e.strerror or e})") from None
    if empty and not cfg.demo_data:
        raise InputError(
            f"--data-dir {data_dir}: {'empty folder' if data_dir.exists() else 'no such folder'} (expected "
            f"{cfg.train_file} and {cfg.validation_file}); check the path, or pass --demo-data to write the demo "
            "NLI dataset there"
        )
    if empty:
        log.info("No data in %s; writing the demo NLI dataset there (--demo-data)", data_dir)
        check_writable(data_dir, "--data-dir")
        write_demo_dataset(data_dir, cfg)
    for f in (train, val):
        if not f.is_file():
            raise InputError(
                f"--data-dir {data_dir}: {f.name} not found (expected {cfg.train_file} and {cfg.validation_file}; "
                "--demo-data writes the demo set into an empty folder)"
            )
    return train, val


def check_writable(folder: Path, flag: str) -> None:
    """Create ``folder`` if needed and prove a file can be written there, or raise InputError naming the flag."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise InputError(f"{flag} {folder}: not writable ({e.strerror or e})") from None


_SUBJECTS = [
    "the cat",
    "a dog",
    "the chef",
    "my neighbour",
    "the pilot",
    "a student",
    "the doctor",
    "the child",
    "an engineer",
    "the singer",
    "the farmer",
    "a tourist",
    "the teacher",
    "a nurse",
    "the baker",
]
_ACTIONS = [
    ("is sleeping", "is not sleeping", "is awake"),
    ("is reading", "is not reading", "is dancing"),
    ("is cooking", "is not cooking", "is swimming"),
    ("is singing", "is not singing", "is silent"),
    ("is running", "is not running", "is sitting still"),
    ("is painting", "is not painting", "is driving"),
    ("is writing", "is not writing", "is shouting"),
    ("is eating", "is not eating", "is fasting"),
]
_PLACES = [
    "in the kitchen",
    "in the park",
    "at the station",
    "on the roof",
    "in the library",
    "at the beach",
    "in the garden",
    "at the market",
    "in the office",
    "on the bus",
]
_TIMES = ["in the morning", "at night", "after lunch", "before dinner", "on sunday", "today"]
_REASONS = [
    "because it is tired",
    "because the weather is nice",
    "for a competition",
    "to impress a friend",
    "since it was asked to",
    "for the first time",
]
_EXTRAS = ["is very happy", "has a red hat", "is famous", "is from another country", "has two brothers", "is hungry"]


def _demo_example(rng: random.Random, label: int) -> dict[str, Any]:
    subj, (act, neg, other), place, time = (
        rng.choice(_SUBJECTS),
        rng.choice(_ACTIONS),
        rng.choice(_PLACES),
        rng.choice(_TIMES),
    )
    premise = f"{subj.capitalize()} {act} {place} {time}."
    other_place = rng.choice([p for p in _PLACES if p != place])
    if label == 0:  # entailment: a restatement with less detail
        hyp = rng.choice([f"{subj} {act}", f"{subj} is {place}", f"someone {act} {place}", f"{subj} {act} {time}"])
    elif label == 1:  # neutral: adds something the premise neither says nor rules out
        hyp = rng.choice(
            [
                f"{subj} {act} {rng.choice(_REASONS)}",
                f"{subj} {rng.choice(_EXTRAS)}",
                f"{subj} {act} {place} with a friend",
            ]
        )
    else:  # contradiction: negates or swaps a detail
        hyp = rng.choice(
            [f"{subj} {neg}", f"{subj} {other} {place}", f"{subj} is {other_place} {time}", f"nobody {act} {place}"]
        )
    return {"premise": premise, "hypothesis": hyp[0].upper() + hyp[1:] + ".", "label": LABELS[label]}


def write_demo_dataset(data_dir: Path, cfg: DataConfig) -> None:
    """Write a small template NLI set with learnable signal; fixed seed, so every run gets the same data.

    Both files are written into a temporary sibling folder that is then renamed into place: a run killed
    halfway leaves no half-written data that the next run would trust (or refuse).
    """
    rng = random.Random(20240229)
    tmp = data_dir.with_name(f".{data_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, size in ((cfg.train_file, cfg.demo_train_size), (cfg.validation_file, cfg.demo_validation_size)):
        rows = [_demo_example(rng, i % len(LABELS)) for i in range(size)]
        rng.shuffle(rows)
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if data_dir.exists():
        data_dir.rmdir()  # known to be empty
    os.replace(tmp, data_dir)


class NLIDataset(Dataset):
    """Pre-tokenized examples: (input_ids, token_type_ids, label)."""

    def __init__(self, examples: Sequence[dict[str, Any]], tokenizer: Any, max_length: int):
        enc = tokenizer(
            [e["premise"] for e in examples],
            [e["hypothesis"] for e in examples],
            truncation=True,
            max_length=max_length,
        )
        self.input_ids = enc["input_ids"]
        self.token_type_ids = enc.get("token_type_ids") or [[0] * len(ids) for ids in self.input_ids]
        self.labels = [e["label"] for e in examples]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[list[int], list[int], int]:
        return self.input_ids[i], self.token_type_ids[i], self.labels[i]


class PadCollator:
    """Pad a batch to its longest example. A class, not a closure, so worker processes can pickle it."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[tuple[list[int], list[int], int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _, _ in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        types = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (i, t, _) in enumerate(batch):
            ids[row, : len(i)] = torch.tensor(i)
            types[row, : len(t)] = torch.tensor(t)
            mask[row, : len(i)] = 1
        labels = torch.tensor([label for _, _, label in batch])
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}


# ---- model ----------------------------------------------------------------------------------------------


def build_tokenizer(train_examples: Sequence[dict[str, Any]]) -> Any:
    """A BERT-style word-level tokenizer whose vocabulary comes from the training data (no download).

    The vocabulary is sorted by (frequency, word), so the same data always gives the same token ids and a
    resumed run's embedding rows mean what they meant before.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for e in train_examples:
        for text in (e["premise"], e["hypothesis"]):
            counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in SPECIAL_TOKENS]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def build_model_and_tokenizer(cfg: ModelConfig, train_examples: Sequence[dict[str, Any]]) -> tuple[Any, Any]:
    # transformers takes seconds to import; keeping it here lets config and data errors come back at once.
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    id2label = dict(enumerate(LABELS))
    label2id = {v: k for k, v in id2label.items()}
    if cfg.name:
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.name)
            model = AutoModelForSequenceClassification.from_pretrained(
                cfg.name, num_labels=cfg.num_labels, id2label=id2label, label2id=label2id
            )
        except (OSError, ValueError) as e:
            raise InputError(f"--model-name {cfg.name}: cannot load it ({str(e).strip().splitlines()[0]})") from None
        return model, tokenizer
    tokenizer = build_tokenizer(train_examples)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=max(cfg.max_length, 8),
        num_labels=cfg.num_labels,
        id2label=id2label,
        label2id=label2id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BertForSequenceClassification(config), tokenizer


# ---- training -------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def precision_context(requested: str, device: torch.device) -> tuple[Any, torch.amp.GradScaler]:
    """An autocast factory and a GradScaler for the requested precision on this device."""
    if requested == "fp16" and device.type != "cuda":
        log.warning(
            "fp16 mixed precision needs CUDA; training in fp32 on %s (use --mixed-precision bf16 there)", device.type
        )
        requested = "no"
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("this GPU does not support bf16; training in fp32")
        requested = "no"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(requested)

    def autocast() -> Any:
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)

    # The scaler stays registered even when disabled, so a checkpoint has the same parts on every machine.
    scaler = torch.amp.GradScaler(device.type, enabled=requested == "fp16")
    return autocast, scaler


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def macro_f1(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    """Unweighted mean of per-class F1 (a class absent from both preds and labels counts as 0, as in sklearn)."""
    f1s = []
    for c in range(num_labels):
        tp = int(np.sum((preds == c) & (labels == c)))
        fp = int(np.sum((preds == c) & (labels != c)))
        fn = int(np.sum((preds != c) & (labels == c)))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1s))


VAL_METRICS = ("val_loss", "val_accuracy", "val_f1_macro")  # what evaluate() returns after every epoch


@torch.no_grad()
def evaluate(model: Any, loader: DataLoader, device: torch.device, autocast: Any, num_labels: int) -> dict[str, float]:
    model.eval()
    preds, labels, loss_sum = [], [], 0.0
    for batch in tqdm(loader, desc="validation", leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            out = model(**batch)
        loss_sum += float(out.loss) * len(batch["labels"])
        preds.append(out.logits.argmax(-1).cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
    model.train()
    p, y = np.concatenate(preds), np.concatenate(labels)
    return {
        "val_loss": loss_sum / len(y),
        "val_accuracy": float(np.mean(p == y)),
        "val_f1_macro": macro_f1(p, y, num_labels),
    }


@dataclass
class Run:
    """Everything one training run holds; the checkpoint manager restores the stateful parts in place."""

    cfg: TrainConfig
    device: torch.device
    model: Any
    tokenizer: Any
    loader: DataLoader
    val_loader: DataLoader
    sampler: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: Any
    n_batches: int
    total_steps: int


def build_run(cfg: TrainConfig, train_examples: list[dict[str, Any]], val_examples: list[dict[str, Any]]) -> Run:
    from syncckpt import ResumableSampler

    tcfg = cfg.training
    seed_everything(tcfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = build_model_and_tokenizer(cfg.model, train_examples)
    model.to(device)
    train_ds = NLIDataset(train_examples, tokenizer, cfg.model.max_length)
    val_ds = NLIDataset(val_examples, tokenizer, cfg.model.max_length)
    collate = PadCollator(tokenizer.pad_token_id)
    sampler = ResumableSampler(train_ds, batch_size=tcfg.batch_size, shuffle=True, seed=tcfg.seed)
    # Loaders get their own generators, so starting a pass never draws from the global RNG that dropout uses:
    # a resumed run then consumes that RNG exactly as the uninterrupted run did.
    loader = DataLoader(
        train_ds,
        batch_size=tcfg.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=tcfg.num_workers,
        generator=torch.Generator().manual_seed(tcfg.seed),
        pin_memory=device.type == "cuda",
    )
    val_loader = DataLoader(
        val_ds,
        batch_size=tcfg.eval_batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=tcfg.num_workers,
        generator=torch.Generator().manual_seed(tcfg.seed),
    )
    n_batches = math.ceil(len(train_ds) / tcfg.batch_size)
    total_steps = math.ceil(n_batches / tcfg.gradient_accumulation_steps) * tcfg.epochs
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
            "weight_decay": tcfg.weight_decay,
        },
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=tcfg.learning_rate)
    scheduler = linear_schedule(optimizer, round(tcfg.warmup_ratio * total_steps), total_steps)
    autocast, scaler = precision_context(tcfg.mixed_precision, device)
    return Run(
        cfg,
        device,
        model,
        tokenizer,
        loader,
        val_loader,
        sampler,
        optimizer,
        scheduler,
        scaler,
        autocast,
        n_batches,
        total_steps,
    )


class Curves:
    """``--tensorboard``: training and validation scalars under ``<output_dir>/tensorboard``. With a remote, the
    folder is mirrored to ``<remote>/tensorboard`` at every epoch end and at the end (syncckpt.sidefolder), and a
    new session with an empty folder pulls it back first, so the curves survive the session."""

    def __init__(self, folder: Path, remote: str | None, storage_options: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        from syncckpt.remote import open_remote
        from syncckpt.sidefolder import pull_folder

        self.folder = folder
        self.remote = open_remote(remote, storage_options) if remote else None
        if self.remote is not None and not any(folder.glob("*")):
            if pulled := pull_folder(self.remote, "tensorboard", folder):
                log.info("TensorBoard: %d files of the earlier sessions pulled from %s", pulled, self.remote.url)
        self.writer = SummaryWriter(str(folder))
        log.info("TensorBoard: scalars in %s%s", folder, f", mirrored to {self.remote.url}" if self.remote else "")

    def step(self, global_step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, global_step)
        self.writer.add_scalar("train/learning_rate", lr, global_step)

    def epoch(self, global_step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"val/{name.removeprefix('val_')}", value, global_step)
        self.sync()

    def sync(self) -> None:
        self.writer.flush()
        if self.remote is not None:
            from syncckpt.sidefolder import push_folder

            push_folder(self.remote, self.folder, "tensorboard")

    def close(self) -> None:
        self.sync()
        self.writer.close()
        if self.remote is not None:
            self.remote.close()


@dataclass
class Progress:
    """How far this run got: the last optimizer step trained and the checkpoint it resumed from (a ResumeInfo)."""

    global_step: int = 0
    resumed: Any = None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says what was saved and what the same command resumes from."""


def interrupted_message(step: int, newest: tuple[str, int | None] | None, remote: str | None, mirrored: bool) -> str:
    """What is true after Ctrl-C at global ``step``, given the newest checkpoint a rerun finds (name, its global
    step) and, with a remote, whether that one is mirrored there.

    >>> interrupted_message(57, ("checkpoint-step-57", 57), None, False)
    'Interrupted at global step 57: last checkpoint checkpoint-step-57 saved; rerun the same command to resume from it'
    >>> print(interrupted_message(57, ("checkpoint-epoch-0", 51), None, False).replace("; ", ";\\n"))  # 2nd Ctrl-C
    Interrupted at global step 57: nothing new was saved since checkpoint-epoch-0 (global step 51);
    rerun the same command to resume from it (the 6 steps since are trained again)
    """
    if newest is None:
        return (
            f"Interrupted at global step {step}: no checkpoint was saved; rerun the same command to train from the "
            "start"
        )
    name, saved_step = newest
    where = ""
    if remote is not None:
        where = f" and mirrored to {remote}" if mirrored else f" (locally only: not mirrored to {remote} yet)"
    if saved_step is None:  # an epoch checkpoint whose local copy is gone (keep_local): its step is not at hand
        return (
            f"Interrupted at global step {step}: the newest checkpoint is {name}{where}; rerun the same command to "
            "resume from it"
        )
    if saved_step >= step:
        return (
            f"Interrupted at global step {step}: last checkpoint {name} saved{where}; rerun the same command to "
            "resume from it"
        )
    lost = step - saved_step
    return (
        f"Interrupted at global step {step}: nothing new was saved since {name} (global step {saved_step}){where}; "
        f"rerun the same command to resume from it (the {lost} step{'s' if lost != 1 else ''} since are trained "
        "again)"
    )


def newest_saved(mgr: Any, resumed: Any) -> tuple[tuple[str, int | None] | None, bool]:
    """The checkpoint a rerun resumes from, as (name, global step), and whether it is mirrored: the newest local one
    (the order resume() tries), else this session's last commit, else the checkpoint this run resumed from."""
    from syncckpt.manifest import parse_checkpoint_name
    from syncckpt.resume import local_candidates
    from syncckpt.select import order_candidates

    st = mgr.status()
    history = set(st.get("mirrored_history") or [])
    found = local_candidates(mgr.directory)
    if found:
        best = order_candidates(found)[0]
        return (best.name, best.global_step), best.name in history
    last = st.get("last_committed")  # keep_local: local copies are deleted once mirrored
    parsed = parse_checkpoint_name(last) if last else None
    if last:
        return (last, parsed[1] if parsed is not None and parsed[0] == "step" else None), last in history
    if resumed is not None:
        return (resumed.name, resumed.global_step), resumed.source == "remote" or resumed.name in history
    return None, False


@contextmanager
def closing(mgr: Any, progress: Progress, remote: str | None) -> Iterator[None]:
    """Close ``mgr`` at the end. On Ctrl-C, raise :class:`Interrupted` saying what a rerun resumes from: the first
    Ctrl-C took a last checkpoint at a step boundary (syncckpt logged it), a second one stopped wherever it
    landed; what was started is let land first."""
    try:
        yield
    except KeyboardInterrupt:
        try:
            mgr.close()
        except KeyboardInterrupt:  # Ctrl-C again while flushing: report what has landed so far
            pass
        newest, mirrored = newest_saved(mgr, progress.resumed)
        raise Interrupted(interrupted_message(progress.global_step, newest, remote, mirrored)) from None
    finally:
        mgr.close()


def train_epoch(
    run: Run,
    mgr: Any,
    epoch: int,
    first: int,
    global_step: int,
    curves: Curves | None = None,
    progress: Progress | None = None,
) -> tuple[int, bool]:
    """Train batches ``first``.. of ``epoch``; returns the global step and whether --max-steps was reached."""
    progress = progress if progress is not None else Progress(global_step)
    tcfg = run.cfg.training
    accum, max_steps = tcfg.gradient_accumulation_steps, tcfg.max_steps
    run.sampler.set_epoch(epoch)
    running = group_loss = 0.0
    bar = tqdm(total=first + len(run.loader), initial=first, desc=f"epoch {epoch + 1}/{tcfg.epochs}", unit="batch")
    try:
        for batch_idx, batch in enumerate(run.loader, start=first):
            batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
            # The last group of an epoch may be short; dividing by its real size keeps every step's gradient
            # an average, whatever the epoch length.
            group_start = batch_idx - batch_idx % accum
            group_len = min(accum, run.n_batches - group_start)
            with run.autocast():
                loss = run.model(**batch).loss
            run.scaler.scale(loss / group_len).backward()
            group_loss += float(loss.detach()) / group_len
            bar.update(1)
            if batch_idx + 1 != group_start + group_len:
                continue
            if tcfg.max_grad_norm is not None:
                run.scaler.unscale_(run.optimizer)
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), tcfg.max_grad_norm)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            global_step += 1
            progress.global_step = global_step
            running = group_loss if running == 0.0 else 0.9 * running + 0.1 * group_loss
            bar.set_postfix(loss=f"{running:.4f}", step=global_step)
            metrics = {"train_loss": group_loss}
            if curves is not None:
                curves.step(global_step, group_loss, run.scheduler.get_last_lr()[0])
            saved = mgr.step(global_step, epoch=epoch, batch_idx=batch_idx, metrics=metrics)
            group_loss = 0.0
            if max_steps is not None and global_step >= max_steps:
                if not saved:  # stopping on purpose: the next run continues from exactly here
                    mgr.save(global_step, epoch=epoch, batch_idx=batch_idx, metrics=metrics)
                return global_step, True
    finally:
        # Under tqdm's lock: close() takes the bar off the screen's list before it draws its last line, and a log
        # line another thread writes in between (the writer's "Removed old checkpoint") would land in the bar.
        with tqdm.get_lock():
            bar.close()
    return global_step, False


def train(
    cfg: TrainConfig,
    *,
    resume_from: str | None,
    no_resume: bool,
    takeover: bool = False,
    start_fresh_if_damaged: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> None:
    from syncckpt import CheckpointManager, NoValidCheckpoint

    tcfg, ccfg = cfg.training, cfg.checkpointing
    check_writable(Path(tcfg.output_dir).expanduser(), "--output-dir")  # found now, not after hours of training
    train_file, val_file = prepare_data_dir(cfg.data)
    train_examples, val_examples = read_split(train_file), read_split(val_file)
    log.info(
        "Data: %d training / %d validation examples from %s", len(train_examples), len(val_examples), train_file.parent
    )
    if cfg.model.name:
        log.info("Model: %s", cfg.model.name)
    else:
        log.info(
            "Model: the tiny demo model, built locally (hidden size %d); pass --model-name to fine-tune a real one",
            cfg.model.hidden_size,
        )
    kwargs = ccfg.manager_kwargs()
    kwargs["storage_options"] = {**kwargs["storage_options"], **(storage_options or {})}
    best = kwargs["metric_for_best"]
    if best is not None and best not in VAL_METRICS:
        # Found now, not at the first epoch end hours later.
        raise InputError(
            f"checkpointing.metric_for_best: {best!r} is not a metric this trainer computes "
            f"(one of {', '.join(VAL_METRICS)})"
        )
    mgr = CheckpointManager(**kwargs, takeover=takeover)
    progress = Progress()
    with closing(mgr, progress, ccfg.remote):  # at the end, waits for checkpoints still being written or uploaded
        if no_resume and mgr.list_local():
            # New checkpoints would mix with the old run's, retention could keep the old (higher-step) ones and
            # delete the new ones, and a later auto-resume would pick the old run.
            raise InputError(
                f"--no-resume: {ccfg.save_dir} already holds checkpoints of an earlier run "
                f"({', '.join(sorted(mgr.list_local()))}); use another --checkpoint-dir or delete them"
            )
        run = build_run(cfg, train_examples, val_examples)
        mgr.register(
            model=run.model, optimizer=run.optimizer, scheduler=run.scheduler, scaler=run.scaler, sampler=run.sampler
        )
        info = None
        if resume_from:
            info = mgr.resume(resume_from)
        elif not no_resume:
            try:  # logs where it resumes from, or that it starts from scratch
                info = mgr.resume(start_fresh_if_damaged=start_fresh_if_damaged)
            except NoValidCheckpoint as e:
                raise InputError(
                    f"no valid checkpoint in {e.where}: {e.report}. They are kept aside (quarantined), never "
                    "overwritten. Choices: --resume-from PATH_OR_URL of a good copy; --start-fresh-if-damaged to "
                    "train from step 0 beside them; or delete them with `syncckpt rm`"
                ) from None
        progress.resumed = info
        global_step = progress.global_step = info.global_step if info else 0
        if info and info.epoch >= tcfg.epochs:
            log.info(
                "Training already complete (%d epochs, global step %d): nothing left to train", tcfg.epochs, global_step
            )
        log.info(
            "Training %d epochs x %d batches (batch size %d, accumulation %d): %d optimizer steps on %s",
            tcfg.epochs,
            run.n_batches,
            tcfg.batch_size,
            tcfg.gradient_accumulation_steps,
            run.total_steps,
            run.device,
        )
        every, minutes = ccfg.save_every_n_batches, ccfg.save_every_n_minutes
        log.info(
            "Step checkpoints: %s%s",
            "off"
            if every is None
            else f"every {every} optimizer steps ({every * tcfg.gradient_accumulation_steps} batches)",
            "" if minutes is None else f", and after {minutes:g} minutes without one",
        )
        stop = tcfg.max_steps is not None and global_step >= tcfg.max_steps
        if stop:
            log.info(
                "Resumed at global step %d, already at --max-steps %d (a total, not a count for this session): "
                "nothing to train",
                global_step,
                tcfg.max_steps,
            )
        output_dir = Path(tcfg.output_dir).expanduser()
        curves = (
            Curves(output_dir / "tensorboard", ccfg.remote, kwargs["storage_options"]) if tcfg.tensorboard else None
        )
        run.model.train()
        for epoch in range(info.epoch if info else 0, tcfg.epochs):
            if stop:
                break
            first = info.batch_idx + 1 if info and epoch == info.epoch else 0
            global_step, stop = train_epoch(run, mgr, epoch, first, global_step, curves, progress)
            if stop:
                break
            metrics = evaluate(run.model, run.val_loader, run.device, run.autocast, cfg.model.num_labels)
            log.info(
                "Epoch %d/%d: val_loss=%.4f val_accuracy=%.4f val_f1_macro=%.4f (global step %d)",
                epoch + 1,
                tcfg.epochs,
                metrics["val_loss"],
                metrics["val_accuracy"],
                metrics["val_f1_macro"],
                global_step,
            )
            mgr.save_epoch(epoch, global_step=global_step, metrics=metrics)  # every save_every_n_epochs; best_model
            if curves is not None:
                curves.epoch(global_step, metrics)
        if stop:
            log.info("Reached --max-steps %d; stopping", tcfg.max_steps)
        if curves is not None:
            curves.close()
    save_final_model(run.model, run.tokenizer, Path(tcfg.output_dir).expanduser() / "final_model")
    log.info("Training complete")


def save_final_model(model: Any, tokenizer: Any, dest: Path) -> None:
    """save_pretrained into a temporary folder, then swap it in, so a kill never leaves half a final model."""
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # left by runs killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    log.info("Final model written to %s", dest)


# ---- entry point ----------------------------------------------------------------------------------------


def load_train_config(args: argparse.Namespace) -> TrainConfig:
    overrides = {key: getattr(args, flag) for flag, key in _OVERRIDES.items()}
    flags = {key: "--" + flag.replace("_", "-") for flag, key in _OVERRIDES.items()}  # errors name the flag
    return load_config(args.config, TrainConfig, search_dirs=[REPO_ROOT], overrides=overrides, override_names=flags)


class SaysInterruptedItself(logging.Filter):
    """This trainer ends a Ctrl-C with its own line (the global step, where the checkpoint is, the command to
    rerun); syncckpt's closing line would say the same a second time, so it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "syncckpt_event", None) != INTERRUPTED_EVENT


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(message)s", force=True)


@contextmanager
def saying_interrupted_itself() -> Iterator[None]:
    """While the trainer runs (and only then: a caller in the same process keeps syncckpt's line)."""
    lib, said = logging.getLogger("syncckpt"), SaysInterruptedItself()
    lib.addFilter(said)
    try:
        yield
    finally:
        lib.removeFilter(said)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_train_config(args)
        with logging_redirect_tqdm(), saying_interrupted_itself():
            train(
                cfg,
                resume_from=args.resume_from,
                no_resume=args.no_resume,
                takeover=args.takeover,
                start_fresh_if_damaged=args.start_fresh_if_damaged,
                storage_options=parse_storage_options(args.storage_option),
            )
    except (SyncCkptError, InputError) as e:
        # Bad input, not a bug: one line the user can act on, and argparse's exit status for bad input.
        message = " ".join(str(e).split())
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    except Interrupted as e:
        log.warning("%s", e)
        return 130
    except KeyboardInterrupt:  # before the checkpoint manager was there (reading the data): nothing to save yet
        log.warning("Interrupted before training started: nothing was saved")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
