"""Train KeyRe-ID (or an ablation of it) with the paper's recipe, select on validation, test once.

Recipe (paper §4 / released code): SGD lr 0.008 (biases 2x), momentum 0.9, weight decay 1e-4,
120 epochs, 5 linear warm-up epochs from 1% of the lr, then cosine down to 0.2% of it (stepped
per epoch as released); centers of the center loss get their own SGD at lr 0.5 with their
gradients scaled by 1 / center_weight (as released); batches of P=4 identities x K=4 tracklets
of T=4 frames; bf16 (or fp16 + GradScaler) autocast on CUDA, fp32 on the CPU.

Honest reporting: the number of epochs (`best.pt`) is chosen on a validation split carved
from the TRAINING identities (`Dataset.validation_split`: held-out ids, one query from one
camera each, gallery from the others, every query with a match; which ids is `--split-seed`,
independent of the initialisation `--seed`). Then, with `--final retrain` (the default for
MARS and iLIDS-VID), the model is trained again on ALL training ids, with the same schedule,
for the selected number of epochs (`final/`, its `final.pt`), and that model is tested once, as
papers train on all 625 MARS ids; `--final best` tests `best.pt` itself (trained on the other
ids; the default for synthetic data and the watcher's tracklets). `--test-every N` adds test
figures during training, labelled `test_*` and for information only: they never choose anything.

The run folder holds config.json, metrics.csv, loss.png / accuracy.png, last.pt (everything
needed to resume: optimizers, scheduler, RNG states, sampler epoch, history), best.pt,
final/ (the retrained model) and results.json (test scores, protocol and AP, precision,
keypoint source and coverage, git commit, dataset fingerprint). Every checkpoint loads in
`reid.Encoder(checkpoint=...)`.

Multi-GPU: `torchrun --nproc-per-node N -m training.train ...` runs DDP (NCCL on CUDA, gloo
on the CPU) with a distributed P x K sampler: each rank takes P whole identities x K tracklets
of every global batch (the global batch is N x P x K). Every rank validates (cheap, identical
results, no communication); rank 0 alone writes files and runs the final test. `--compile`
wraps the training forward in `torch.compile`.

    python -m training.train --dataset synthetic --root data/synthetic --model keyreid_vit_tiny \\
        --model-opt depth=4 img_size=[128,64] --epochs 40 --out runs/synthetic-tiny
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data
from tqdm import tqdm

from reid.checkpoints import read_checkpoint, save_checkpoint
from reid.losses import KeyReIDLoss
from reid.model import KeyReID
from reid.registry import build_model, get_config, list_models
from training.evaluate import (AP_NAMES, PROTOCOLS, Scores, autocast_dtype, default_keypoints, evaluate_model,
                               load_dataset, parse_key_values, protocol_options, resolve_device)
from training.packed import DATA_FORMATS, frame_reader
from training.provenance import check_keypoint_coverage, dataset_fingerprint, git_commit, keypoint_coverage
from training.records import KEYPOINT_BACKENDS, Dataset
from training.sampling import RandomIdentitySampler
from training.transforms import ClipDataset, collate_clips, limit_worker_threads, worker_context

log = logging.getLogger(__name__)

# Config fields that may differ between a run and its resumption: they change how the run is
# executed or reported, not the maths (`epochs` is not one of them: the cosine depends on it).
_RESUMABLE_CHANGES = frozenset({"resume", "workers", "device", "eval_every", "test_every", "stop_after",
                                "progress", "eval_batch_size", "out", "persistent_workers", "data_format",
                                "compile"})
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
FINAL_MODES: tuple[str, ...] = ("auto", "retrain", "best")
BENCHMARKS: tuple[str, ...] = ("mars", "ilidsvid", "ilids-vid")  # `--final auto` retrains on all ids
WARMUP_START = 0.01  # warm-up starts at 1% of the lr (released: warmup_lr_init = 0.01 * lr)
COSINE_FLOOR = 0.002  # cosine ends at 0.2% of the lr (released: lr_min = 0.002 * lr)


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run (written to config.json; see the module docstring)."""

    dataset: str = "synthetic"
    root: str = "data/synthetic"
    model: str = "keyreid_vit_base"
    pretrained: str | None = None
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    dataset_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    split: int | None = None
    keypoints: str | None = None  # cache backend; None: groundtruth (synthetic) / first cache found
    optimizer: str = "sgd"  # the paper's SGD; "adamw" learns far faster for small models from scratch
    epochs: int = 120
    batch_p: int = 4
    batch_k: int = 4
    lr: float = 0.008
    bias_lr_factor: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: int = 5
    center_lr: float = 0.5
    val_fraction: float = 0.1
    split_seed: int = 0  # which training ids validation holds out (independent of `seed`)
    final: str = "auto"  # retrain | best | auto (retrain for MARS / iLIDS-VID): what the test sees
    validate: bool = True  # False: train on all training ids, no selection, test the last model
    stop_epoch: int | None = None  # end training here within the `epochs`-long schedule (retraining)
    protocol: str = "community"  # evaluation protocol (training.evaluate.PROTOCOLS)
    allow_missing_keypoints: bool = False  # train a keypoint-guided model on data lacking keypoints
    eval_every: int = 5
    test_every: int = 0
    eval_batch_size: int = 64
    device: str = "auto"
    amp: str = "auto"
    seed: int = 0
    workers: int = 4
    persistent_workers: bool = True  # keep loader workers across epochs (workers > 0)
    data_format: str = "auto"  # files | packed | auto (packed when <root>/packed exists)
    compile: bool = False  # torch.compile the training forward
    out: str = "runs/train"
    resume: bool = False
    stop_after: int | None = None  # stop after this many epochs in THIS session (resume later)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.model not in list_models():
            raise ValueError(f"unknown model {self.model!r}; available: {', '.join(list_models())}")
        if self.epochs < 1 or not 0 <= self.warmup < max(2, self.epochs):
            raise ValueError(f"need epochs >= 1 and 0 <= warmup < epochs (got epochs={self.epochs}, warmup={self.warmup})")
        if self.keypoints is not None and self.keypoints not in KEYPOINT_BACKENDS:
            raise ValueError(f"keypoints={self.keypoints!r} not in {KEYPOINT_BACKENDS}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} not in {OPTIMIZERS}")
        if self.eval_every < 1:
            raise ValueError("eval_every must be >= 1 (the last epoch is always validated)")
        if self.final not in FINAL_MODES:
            raise ValueError(f"final={self.final!r} not in {FINAL_MODES}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol={self.protocol!r} not in {sorted(PROTOCOLS)}")
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data_format={self.data_format!r} not in {DATA_FORMATS}")
        if self.stop_epoch is not None and not 1 <= self.stop_epoch <= self.epochs:
            raise ValueError(f"stop_epoch={self.stop_epoch} must be in 1..epochs ({self.epochs})")

    @property
    def retrain(self) -> bool:
        """Whether the tested model is retrained on all training ids after selection."""
        return self.validate and (self.final == "retrain" or (self.final == "auto" and self.dataset in BENCHMARKS))

    @property
    def last_epoch(self) -> int:
        return self.epochs if self.stop_epoch is None else self.stop_epoch


@dataclasses.dataclass
class RunResult:
    """What a run produced. `test` is None when the run stopped before its last epoch or the
    dataset has no labelled test set (`tracklets`)."""

    run_dir: Path
    epochs_done: int
    completed: bool
    best_epoch: int | None
    best_val: dict[str, float]
    test: dict[str, float] | None
    history: list[dict[str, float]]
    train_time_s: float
    last_checkpoint: Path
    best_checkpoint: Path


def lr_factor(epoch: int, epochs: int, warmup: int) -> float:
    """Multiplier of the base lr during `epoch` (0-based): linear warm-up from WARMUP_START over
    `warmup` epochs, then a cosine from 1 down to COSINE_FLOOR at the last epoch."""
    if epoch < warmup:
        return WARMUP_START + (1.0 - WARMUP_START) * epoch / warmup
    span = max(1, epochs - 1 - warmup)
    progress = min(1.0, (epoch - warmup) / span)
    return COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Weights at lr, biases at `bias_lr_factor` x lr (released recipe); weight decay on all."""
    weights, biases = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (biases if name.endswith("bias") else weights).append(parameter)
    return [{"params": weights, "lr": config.lr, "weight_decay": config.weight_decay},
            {"params": biases, "lr": config.lr * config.bias_lr_factor, "weight_decay": config.weight_decay}]


def prepare_data(config: TrainConfig) -> tuple[Dataset, Dataset | None, str | None, str]:
    """(full dataset under the run's protocol, validation dataset with relabelled train ids or
    None without validation, keypoint backend, AP mode)."""
    backend = default_keypoints(config.dataset, config.root, config.keypoints)
    options, ap_mode = protocol_options(config.dataset, config.protocol, config.dataset_options)
    full = load_dataset(config.dataset, config.root, backend, config.split, options)
    val = full.validation_split(config.val_fraction, seed=config.split_seed) if config.validate else None
    return full, val, backend, ap_mode


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (world size 1, rank 0 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Distributed:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT): NCCL on CUDA, gloo on the CPU. Nothing without torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Distributed()
    context = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not torch.distributed.is_initialized():
        cuda = resolve_device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(context.local_rank)
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=context.rank,
                                             world_size=context.world_size)
    return context


def _rng_state() -> dict[str, Any]:
    """Global RNG states in types `torch.load(weights_only=True)` accepts (so the Encoder can
    read last.pt): tensors, ints, floats, tuples."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    current = dataclasses.asdict(config)
    changed = {k: (saved.get(k), v) for k, v in current.items()
               if k not in _RESUMABLE_CHANGES and saved.get(k) != v}
    if changed:
        raise ValueError(f"--resume with a different config than the run's config.json "
                         f"(saved, now): {changed}")


def write_metrics(history: list[dict[str, float]], path: Path) -> None:
    """Rewrite metrics.csv from the history (columns in order of first appearance)."""
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    temporary = path.with_suffix(".tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    temporary.replace(path)


def write_plots(history: list[dict[str, float]], run_dir: Path) -> None:
    """loss.png (total and branch losses) and accuracy.png (validation mAP / rank-1, and test
    figures when asked for, dashed and labelled 'information only')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, axis = plt.subplots(figsize=(7, 4))
    for key in ("loss_total", "loss_global", "loss_local"):
        points = [(row["epoch"], row[key]) for row in history if key in row]
        if points:
            axis.plot(*zip(*points), label=key.removeprefix("loss_"))
    axis.set_xlabel("epoch")
    axis.set_ylabel("training loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(run_dir / "loss.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4))
    for key, style, label in (("val_mAP", "-o", "validation mAP"), ("val_R1", "-s", "validation rank-1"),
                              ("test_mAP", "--", "test mAP (information only)"),
                              ("test_R1", ":", "test rank-1 (information only)")):
        points = [(row["epoch"], row[key]) for row in history if key in row]
        if points:
            axis.plot(*zip(*points), style, label=label, markersize=3)
    axis.set_xlabel("epoch")
    axis.set_ylabel("%")
    axis.set_xlim(0.5, max(epochs) + 0.5 if epochs else 1)
    if axis.lines:  # a run without validation (the retraining in final/) has nothing to plot here
        axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(run_dir / "accuracy.png", dpi=100)
    plt.close(figure)


class Trainer:
    """The model, its optimizers and data for one run; `run()` trains to the end (or `stop_after`)."""

    def __init__(self, config: TrainConfig, dist: Distributed | None = None) -> None:
        self.config = config
        self.dist = dist or Distributed()
        self.run_dir = Path(config.out)
        self.device = resolve_device(config.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.amp_dtype = autocast_dtype(self.device, config.amp)
        self.full, self.val, self.keypoints, self.ap_mode = prepare_data(config)
        self.train_records = self.val.train if self.val is not None else self.full.train
        model_config = get_config(config.model, **config.model_options)
        if model_config.local == "keypoints":
            self.coverage = check_keypoint_coverage(self.full, self.keypoints, config.allow_missing_keypoints)
        else:
            self.coverage = keypoint_coverage(self.full)
        self.model: KeyReID = build_model(config.model, pretrained=config.pretrained, seed=config.seed,
                                          num_classes=len({r.pid for r in self.train_records}),
                                          num_cameras=self.full.num_cameras, **config.model_options).to(self.device)
        self.forward_model: torch.nn.Module = self.model
        if self.dist.enabled:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.criterion = KeyReIDLoss.for_model(self.model).to(self.device)
        groups = parameter_groups(self.model, config)
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=config.lr)
        self.center_optimizer = torch.optim.SGD(self.criterion.center_parameters(), lr=config.center_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda epoch: lr_factor(epoch, config.epochs, config.warmup))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.sampler = RandomIdentitySampler(self.train_records, P=config.batch_p, K=config.batch_k, seed=config.seed,
                                             num_replicas=self.dist.world_size, rank=self.dist.rank)
        self.frames = frame_reader(config.root, config.data_format)
        self.fingerprint, self.git = dataset_fingerprint(self.full), git_commit()
        self.train_clips = ClipDataset(self.train_records, mode="train", T=self.model.config.num_frames,
                                       size=self.model.config.img_size, frames=self.frames)
        self._train_loader: torch.utils.data.DataLoader | None = None
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, float]] = []
        self.best_epoch: int | None = None
        self.best_val: dict[str, float] = {}
        self.train_time = 0.0

    # ---- checkpoints -------------------------------------------------------------------------
    def _training_info(self) -> dict[str, Any]:
        return {"dataset": self.config.dataset, "split": self.config.split, "keypoints": self.keypoints,
                "epoch": self.epoch, "val": self.best_val if self.best_epoch == self.epoch else {},
                "config": dataclasses.asdict(self.config), "git": self.git,
                "dataset_fingerprint": self.fingerprint, "train_ids": self.sampler_ids}

    @property
    def sampler_ids(self) -> int:
        return len(self.sampler.by_pid)

    def save_last(self) -> None:
        save_checkpoint(
            self.model, self.run_dir / "last.pt", self.config.model, training=self._training_info(),
            optimizer=self.optimizer.state_dict(), center_optimizer=self.center_optimizer.state_dict(),
            criterion=self.criterion.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), epoch=self.epoch, sampler_epoch=self.sampler.epoch,
            rng=_rng_state(), history=self.history, best_epoch=self.best_epoch, best_val=self.best_val,
            train_time=self.train_time)

    def load_last(self) -> None:
        path = self.run_dir / "last.pt"
        payload = read_checkpoint(path)
        self.model.load_state_dict(payload["state_dict"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.center_optimizer.load_state_dict(payload["center_optimizer"])
        self.criterion.load_state_dict(payload["criterion"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.epoch = int(payload["epoch"])
        self.sampler.set_epoch(int(payload["sampler_epoch"]))
        self.history = list(payload["history"])
        self.best_epoch, self.best_val = payload["best_epoch"], dict(payload["best_val"])
        self.train_time = float(payload["train_time"])
        _set_rng_state(payload["rng"])
        log.info("resumed %s after epoch %d", path, self.epoch)

    # ---- one epoch -----------------------------------------------------------------------------
    def _loader(self) -> torch.utils.data.DataLoader:
        """The training loader: a new one per epoch (worker seeds from (seed, epoch): exact
        resumes) unless persistent workers are kept across epochs (no start-up per epoch)."""
        workers = self.config.workers
        persistent = self.config.persistent_workers and workers > 0
        if persistent and self._train_loader is not None:
            return self._train_loader
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + self.epoch + 7919 * self.dist.rank)
        loader = torch.utils.data.DataLoader(
            self.train_clips, batch_sampler=self.sampler, num_workers=workers, collate_fn=collate_clips,
            generator=generator, pin_memory=self.device.type == "cuda", persistent_workers=persistent,
            prefetch_factor=4 if workers > 0 else None, worker_init_fn=limit_worker_threads if workers > 0 else None,
            multiprocessing_context=worker_context(workers))
        if persistent:
            self._train_loader = loader
        return loader

    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        self.criterion.train()
        sums: dict[str, float] = {}
        batches = 0
        bar = tqdm(self._loader(), total=len(self.sampler), desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                   leave=False, disable=not self.config.progress or not self.dist.is_main, dynamic_ncols=True)
        for batch in bar:
            frames = batch["frames"].to(self.device, non_blocking=True)
            keypoints = batch["keypoints"].to(self.device, non_blocking=True)
            cams, pids = batch["camid"].to(self.device), batch["pid"].to(self.device)
            erased = batch["erased"].to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            self.center_optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.forward_model(frames, keypoints, cams)
            loss, terms = self.criterion(_float_output(out), pids, erased)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {self.epoch + 1}: {terms}")
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.unscale_(self.center_optimizer)
            for parameter in self.criterion.center_parameters():
                if parameter.grad is not None:
                    if self.dist.enabled:  # DDP averages the model's gradients; the centers are outside it
                        torch.distributed.all_reduce(parameter.grad)
                        parameter.grad.div_(self.dist.world_size)
                    parameter.grad.mul_(1.0 / self.criterion.center_weight)
            self.scaler.step(self.center_optimizer)
            self.scaler.update()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value
            batches += 1
            bar.set_postfix(loss=f"{terms['total']:.3f}")
        if batches == 0:
            raise RuntimeError("the identity sampler produced no batch: too few identities for P x K")
        return {f"loss_{key}": value / batches for key, value in sums.items()}

    def _scores(self, dataset: Dataset, label: str) -> Scores:
        return evaluate_model(self.model, dataset, self.device, self.config.eval_batch_size, self.config.workers,
                              self.amp_dtype, self.config.progress and self.dist.is_main, label=label,
                              ap_mode=self.ap_mode, frames=self.frames)

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> RunResult:
        config = self.config
        main = self.dist.is_main
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / "config.json"
        if config.resume and (self.run_dir / "last.pt").is_file():
            _check_resumable(json.loads(config_path.read_text()), config)
            self.load_last()
        elif (self.run_dir / "last.pt").is_file():
            raise FileExistsError(f"{self.run_dir} already holds a run (last.pt): pass --resume to continue it "
                                  f"or choose another --out")
        if main:
            config_path.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
            log.info("%s\n%s\nkeypoints: %s (coverage %s), device: %s, amp: %s, ranks: %d", self.full.summary(),
                     f"validation split:\n{self.val.summary()}" if self.val is not None else "no validation: all training ids",
                     self.keypoints, self.coverage, self.device, self.amp_dtype, self.dist.world_size)
        session_epochs = 0
        while self.epoch < config.last_epoch:
            if config.stop_after is not None and session_epochs >= config.stop_after:
                break
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            row: dict[str, float] = {"epoch": self.epoch + 1, "lr": lr, **self.train_epoch()}
            self.scheduler.step()
            self.epoch += 1
            session_epochs += 1
            self.train_time += time.perf_counter() - started
            row["train_time_s"] = self.train_time
            if self.val is not None and (self.epoch % config.eval_every == 0 or self.epoch == config.last_epoch):
                row.update(self._scores(self.val, "val").as_dict("val_"))
                if self.best_epoch is None or row["val_mAP"] > self.best_val["val_mAP"]:
                    self.best_epoch = self.epoch
                    self.best_val = {k: v for k, v in row.items() if k.startswith("val_")}
                    if main:
                        save_checkpoint(self.model, self.run_dir / "best.pt", config.model,
                                        training=self._training_info())
            if config.test_every and self.epoch % config.test_every == 0 and self.full.query and main:
                row.update(self._scores(self.full, "test (information only)").as_dict("test_"))
            self.history.append(row)
            if main:
                self.save_last()
                write_metrics(self.history, self.run_dir / "metrics.csv")
                write_plots(self.history, self.run_dir)
            if main:  # losses are rank 0's share of the batch; validation is the same on every rank
                log.info("epoch %d/%d: %s", self.epoch, config.last_epoch,
                         ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        completed = self.epoch >= config.last_epoch
        if completed and self.val is None and main:
            save_checkpoint(self.model, self.run_dir / "final.pt", config.model, training=self._training_info())
        test = None
        if completed:
            if config.retrain:
                test = self.retrain_and_test()
            elif main:
                test = self.final_test()
        return RunResult(run_dir=self.run_dir, epochs_done=self.epoch, completed=completed,
                         best_epoch=self.best_epoch, best_val=self.best_val, test=test, history=self.history,
                         train_time_s=self.train_time, last_checkpoint=self.run_dir / "last.pt",
                         best_checkpoint=self.run_dir / "best.pt")

    def retrain_and_test(self) -> dict[str, float] | None:
        """Train again on all training ids for the selected number of epochs (`final/`, same seed
        and schedule), test that model once and write this run's results.json."""
        final_dir = self.run_dir / "final"
        final_config = dataclasses.replace(self.config, out=str(final_dir), validate=False, final="best",
                                           stop_epoch=self.best_epoch, test_every=0,
                                           resume=(final_dir / "last.pt").is_file())
        log.info("retraining on all %d training ids for the selected %d epochs -> %s",
                 self.full.num_train_pids, self.best_epoch, final_dir)
        final = Trainer(final_config, self.dist).run()
        if not self.dist.is_main:
            return None
        results = json.loads((final_dir / "results.json").read_text())
        results.update(self._selection_info(), test_model=f"final/final.pt (all {self.full.num_train_pids} "
                       f"training ids, {self.best_epoch} epochs)",
                       train_time_s=self.train_time + final.train_time_s, selection_train_time_s=self.train_time)
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return final.test

    def _selection_info(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_val": self.best_val,
                "validation": None if self.val is None else {
                    "split_seed": self.config.split_seed, "held_out_ids": len({r.pid for r in self.val.query}),
                    "queries": len(self.val.query), "gallery": len(self.val.gallery),
                    "train_ids": self.sampler_ids}}

    def _provenance(self) -> dict[str, Any]:
        return {"dataset": self.full.name, "protocol": self.config.protocol,
                "ap": f"{self.ap_mode}: {AP_NAMES[self.ap_mode]}",
                "precision": "fp32" if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch."),
                "keypoints": self.keypoints, "keypoint_coverage": self.coverage, "git": self.git,
                "dataset_fingerprint": self.fingerprint, "world_size": self.dist.world_size}

    def final_test(self) -> dict[str, float] | None:
        """Evaluate the selected model (best.pt; without validation the last one) on the test
        set, once; write results.json. None for a dataset without a labelled test set (the
        watcher's tracklets): only validation chose and scored best.pt."""
        results: dict[str, Any] = {**self._provenance(), **self._selection_info(), "train_time_s": self.train_time}
        if not self.full.query or not self.full.gallery:
            log.warning("%s has no query/gallery (no labelled test set): final test skipped; best.pt was "
                        "chosen on validation (epoch %s)", self.full.name, self.best_epoch)
            results["test"] = None
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            return None
        if self.val is not None:
            self.model.load_state_dict(read_checkpoint(self.run_dir / "best.pt")["state_dict"])
        scores = self._scores(self.full, "test")
        test = scores.as_dict()
        results.update(test=test, test_model="best.pt" if self.val is not None else "final.pt",
                       test_queries=scores.num_query, test_skipped_queries=scores.num_skipped_queries,
                       test_gallery=scores.num_gallery, precision_check=scores.precision_check)
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        log.info("TEST (%s): %s", results["test_model"], ", ".join(f"{k}={v:.2f}" for k, v in test.items()))
        return test


def _float_output(out: Any) -> Any:
    """Losses in fp32 whatever the autocast dtype (softmax/cdist in bf16 lose too much)."""
    return dataclasses.replace(out, **{f.name: getattr(out, f.name).float()
                                       for f in dataclasses.fields(out) if getattr(out, f.name) is not None})


def train(config: TrainConfig) -> RunResult:
    """Train (or resume) the run `config` describes; see the module docstring. Under torchrun
    this process is one DDP rank; the process group it created is closed at the end."""
    dist = init_distributed(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    try:
        return Trainer(config, dist).run()
    finally:
        if dist.enabled:
            torch.distributed.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=["mars", "ilidsvid", "synthetic", "tracklets"])
    parser.add_argument("--root", required=True, help="dataset folder (synthetic: generated there if missing)")
    parser.add_argument("--model", required=True, choices=list_models())
    parser.add_argument("--pretrained", default=None,
                        help="backbone weights, loaded strictly (reid.pretrained): a timm .pth/.safetensors/.npz, "
                             "a TransReID / VID-Trans-ReID state dict, one of our checkpoints, or timm:NAME "
                             "(downloaded by timm, e.g. timm:vit_base_patch16_224.augreg_in21k)")
    parser.add_argument("--model-opt", nargs="*", default=[], metavar="KEY=VALUE",
                        help="reid.config.ModelConfig overrides, e.g. depth=4 img_size=[128,64] local=whole")
    parser.add_argument("--dataset-opt", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dataset options, e.g. num_ids=96 (synthetic generator)")
    parser.add_argument("--split", type=int, default=None, help="iLIDS-VID split 0..9")
    parser.add_argument("--keypoints", default=None, choices=KEYPOINT_BACKENDS)
    parser.add_argument("--protocol", default=defaults.protocol, choices=sorted(PROTOCOLS),
                        help="community (torchreid gallery, step AP) or official (MARS: all 12,180 test "
                             "tracklets as gallery, interpolated AP); validation uses the same AP")
    parser.add_argument("--split-seed", type=int, default=defaults.split_seed,
                        help="which training ids validation holds out (independent of --seed)")
    parser.add_argument("--final", default=defaults.final, choices=FINAL_MODES,
                        help="retrain: after selection, train on all training ids for the selected epochs and "
                             "test that model; best: test best.pt; auto: retrain for mars/ilidsvid, else best")
    parser.add_argument("--allow-missing-keypoints", action="store_true",
                        help="train a keypoint-guided model although more than 2%% of tracklets lack keypoints")
    parser.add_argument("--data-format", default=defaults.data_format, choices=DATA_FORMATS,
                        help="frames from files, from packed shards (python -m training.packed), or auto")
    parser.add_argument("--no-persistent-workers", action="store_true",
                        help="restart loader workers every epoch (exactly resumable with workers > 0)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    for name in ("epochs", "warmup", "eval_every", "test_every", "seed", "workers", "eval_batch_size"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--batch-p", type=int, default=defaults.batch_p, help="identities per batch")
    parser.add_argument("--batch-k", type=int, default=defaults.batch_k, help="tracklets per identity")
    for name in ("lr", "center_lr", "weight_decay", "momentum", "val_fraction"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--optimizer", default=defaults.optimizer, choices=OPTIMIZERS,
                        help="sgd (the paper's recipe) or adamw (small models trained from scratch)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    parser.add_argument("--out", default=None, help="run folder (default runs/<model>-<dataset>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after N epochs in this session (continue later with --resume)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        dataset=args.dataset, root=args.root, model=args.model, pretrained=args.pretrained,
        model_options=parse_key_values(args.model_opt), dataset_options=parse_key_values(args.dataset_opt),
        split=args.split, keypoints=args.keypoints, epochs=args.epochs, batch_p=args.batch_p, batch_k=args.batch_k,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, warmup=args.warmup,
        center_lr=args.center_lr, val_fraction=args.val_fraction, eval_every=args.eval_every,
        test_every=args.test_every, eval_batch_size=args.eval_batch_size, device=args.device, amp=args.amp,
        seed=args.seed, workers=args.workers, out=args.out or f"runs/{args.model}-{args.dataset}",
        resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress, protocol=args.protocol,
        split_seed=args.split_seed, final=args.final, allow_missing_keypoints=args.allow_missing_keypoints,
        data_format=args.data_format, persistent_workers=not args.no_persistent_workers, compile=args.compile)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = train(config_from_args(build_parser().parse_args(argv)))
    if not result.completed:
        print(f"stopped after epoch {result.epochs_done}; continue with --resume --out {result.run_dir}")
        return 0
    print(f"best validation epoch {result.best_epoch}: " + ", ".join(f"{k}={v:.2f}" for k, v in result.best_val.items()))
    results_file = result.run_dir / "results.json"
    if result.test is None:
        print("test: skipped (no labelled query/gallery, or not rank 0)")
    else:
        results = json.loads(results_file.read_text())
        print(f"test ({results['test_model']}; protocol {results['protocol']}, {results['ap']}): "
              + ", ".join(f"{k}={v:.2f}" for k, v in result.test.items()))
    print(f"run folder: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
