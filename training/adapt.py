"""Site adaptation: fine-tune the re-id encoder on a site's own tracklets, across its cameras.

    python -m training.adapt --db sqlite:///keyreid.db --out runs/adapt-site \\
        [--from runs/synthetic-tiny/best.pt] [--budget 10] [--rounds 3]

Why not "every tracklet is its own identity" (`train --dataset tracklets`): the same person's
tracklets in two cameras are then trained *apart*, exactly the pairs cross-camera re-id must
bring together (measured: it made the demo's cross-camera mAP worse). Here the labels are
cross-camera pseudo-identities, refined over rounds, as in unsupervised video re-id by tracklet
association (Li et al., TAUDL/UTAL) and clustering-based pseudo-labels (cluster contrast):

1. export the stored tracklets' crops once (`training.export_tracklets`, resumable) and hold
   out a fraction of them (`--held-out`) for model selection only;
2. each round: encode every tracklet with the current model as the watcher will (clip
   descriptors standardised per camera, `reid.normalisation`, with statistics fitted on this
   site's clips; unit tracklet descriptors as `storage` builds them); **free negatives** are
   tracklets of one camera (and run) that overlap in time: always two people; the similarity
   threshold is the one at which only `--target-false-link` of those free negatives would pass;
   **associations** are cross-camera pairs that are each other's nearest tracklet in the other's
   camera and more similar than that threshold, merged greedily (most similar first) into
   pseudo-identities, never joining two tracklets that are free negatives of each other;
3. train for the round's share of `--budget` on all training tracklets: an associated tracklet
   takes its pseudo-identity, every other one is an identity of its own; batch-hard triplets on
   the global and part features (the paper's metric loss; no classifier, whose label set
   changes every round), P identities x K clips, each clip from a random tracklet of its
   identity (a tracklet is its own positive over time). Negatives are camera-aware (TAUDL's
   within-camera tracklet discrimination): two tracklets of one camera, or two pseudo-identities;
   an unassociated tracklet is never pushed away from another camera's tracklets, one of which
   may be the same person (training them apart is the failure above);
4. model selection (`results.json` "selection"): the candidates are the starting model and the
   model after each round; the signal is **cross-camera matches on the held-out tracklets**:
   the fraction of them whose nearest other-camera tracklet is a mutual nearest neighbour and
   clears the free-negative threshold of that candidate. It can see cross-camera errors (a
   model that does not bring one person's cameras together finds no confident cross-camera
   match; one that merges everybody raises the free negatives and so the threshold), unlike a
   tracklet's first half vs its second half in one camera, which it replaces. The starting
   model stays the answer when no round beats it.

Clips are encoded with camera unknown (camid -1), as the watcher encodes them. The out folder
holds the export (`tracklets/`), per round a checkpoint (`round-N.pt`) and its pseudo-identities
(`round-N-identities.json`, lists of tracklet ids), `state.json` (resume: a rerun continues after
the last finished round), `adapted.pt` and `results.json`. `adapted.pt` is the selected model
with the per-camera statistics of this site fitted with it, the compact-descriptor projection
fitted on this site's clips after them (`reid.projection`; the cross-camera labels are distances
between compact descriptors, as the encoder makes them) (for `reid: {checkpoint: ...}` of
`keyreid-watch` and the dashboard; a camera added later gets pooled statistics until the next
adaptation); it records what it was adapted on and the before/after figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from reid.checkpoints import file_digest, load_model, read_checkpoint, save_checkpoint
from reid.losses import batch_hard_triplet
from reid.model import KeyReID
from reid.normalisation import CROSS_GENUINE_KEY
from reid.normalisation import PAYLOAD_KEY as NORMALISATION_KEY
from reid.normalisation import CameraNormalisation
from reid.projection import PAYLOAD_KEY as PROJECTION_KEY
from reid.projection import Projection, needs_projection
from reid.registry import build_model, list_models
from storage.engine import display_url
from storage.similarity import unit
from training.evaluate import extract_clip_descriptors, parse_key_values
from training.metrics import mean_per_tracklet
from training.export_tracklets import export_tracklets
from training.project import MAX_FIT_CLIPS, sample_clips
from training.provenance import git_commit
from training.records import TrackletRecord
from training.sampling import RandomIdentitySampler
from training.tracklets import UNKNOWN_CAMERA, load_tracklets, read_manifest, temporal_halves
from training.transforms import ClipDataset, collate_clips

log = logging.getLogger(__name__)

SELECTION_SIGNAL = ("cross-camera matches on held-out tracklets: the fraction whose nearest other-camera "
                    "tracklet is a mutual nearest neighbour more similar than the free-negative threshold "
                    "(same-camera tracklets overlapping in time) at the selection false-link rate")
MIN_IDENTITIES = 2


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    db: str
    out: str
    source: str | None = None  # checkpoint to start from; None = `model` from scratch
    model: str = "keyreid_vit_tiny"
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # scratch only
    budget_minutes: float = 10.0
    rounds: int = 3
    held_out: float = 0.2
    target_false_link: float = 0.01
    selection_false_link: float = 0.1
    lr: float = 3e-5
    weight_decay: float = 1e-4
    batch_p: int = 8
    batch_k: int = 4
    seed: int = 0
    min_clips: int = 1
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.budget_minutes <= 0:
            problems.append(f"budget must be > 0 minutes, got {self.budget_minutes}")
        if self.rounds < 0:
            problems.append(f"rounds must be >= 0 (0: camera statistics only), got {self.rounds}")
        if not 0.0 < self.held_out < 0.5:
            problems.append(f"held-out fraction must be in (0, 0.5), got {self.held_out}")
        for name in ("target_false_link", "selection_false_link"):
            if not 0.0 < getattr(self, name) < 0.5:
                problems.append(f"{name.replace('_', ' ')} rate must be in (0, 0.5), got {getattr(self, name)}")
        if self.batch_p < 2 or self.batch_k < 2:
            problems.append(f"batches need P >= 2 identities x K >= 2 clips, got {self.batch_p} x {self.batch_k}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class SiteTracklet:
    """One exported tracklet: where and when it was seen (stream seconds of its watcher run)."""

    tracklet_id: int
    camera: str
    run_id: int
    first_time: float
    last_time: float


def site_tracklets(manifest: dict[int, dict]) -> list[SiteTracklet]:
    """The manifest's tracklets in tracklet-id order (the order of `load_tracklets`' records)."""
    return [SiteTracklet(tracklet_id, entry["camera"], int(entry["run_id"]), float(entry["first_time"]),
                         float(entry["last_time"])) for tracklet_id, entry in sorted(manifest.items())]


def free_negatives(tracklets: Sequence[SiteTracklet]) -> np.ndarray:
    """`[N, N]` bool: tracklets of one camera and run that overlap in time, always two people."""
    camera = np.array([f"{t.camera}\0{t.run_id}" for t in tracklets])
    first = np.array([t.first_time for t in tracklets])
    last = np.array([t.last_time for t in tracklets])
    overlap = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    negatives = (camera[:, None] == camera[None, :]) & overlap
    np.fill_diagonal(negatives, False)
    return negatives


@dataclasses.dataclass
class Mining:
    """One round's pseudo-identities: `labels[i]` for tracklet i (-1 = not associated)."""

    labels: np.ndarray
    threshold: float | None  # cosine similarity an association must exceed
    free_negative_pairs: int
    candidate_pairs: int  # mutual nearest cross-camera pairs above the threshold
    merged_pairs: int
    refused_pairs: int  # candidates that would have joined two free negatives
    target_false_link: float = 0.0
    merged: list[tuple[float, int, int]] = dataclasses.field(default_factory=list)  # (cosine, i, j)

    @property
    def identities(self) -> int:
        return int(len(set(self.labels[self.labels >= 0].tolist())))

    @property
    def associated(self) -> int:
        return int((self.labels >= 0).sum())

    def summary(self) -> dict[str, Any]:
        return {"target_false_link": self.target_false_link, "threshold": self.threshold, "free_negative_pairs": self.free_negative_pairs,
                "candidate_pairs": self.candidate_pairs, "merged_pairs": self.merged_pairs,
                "refused_pairs": self.refused_pairs, "identities": self.identities,
                "associated_tracklets": self.associated}


def negative_threshold(similarity: np.ndarray, negatives: np.ndarray, target_false_link: float) -> float | None:
    """The similarity only `target_false_link` of the free negatives exceed (None: no negatives)."""
    values = similarity[np.triu(negatives, 1)]
    if values.size == 0:
        return None
    return float(np.quantile(values, 1.0 - target_false_link))


def mutual_cross_camera_pairs(similarity: np.ndarray, cameras: np.ndarray, threshold: float,
                              members: np.ndarray | None = None) -> list[tuple[float, int, int]]:
    """(similarity, i, j) for tracklets i < j of different cameras that are each other's nearest
    tracklet in the other's camera and more similar than `threshold`, most similar first.
    `members`: restrict i to these indices (j ranges over everybody)."""
    pairs = []
    rows = range(len(cameras)) if members is None else members
    for camera in np.unique(cameras):
        in_camera = cameras == camera
        if in_camera.all():
            continue
        # best[k, c]: index of tracklet k's nearest tracklet in camera c
        block = np.where(in_camera[None, :], similarity, -np.inf)
        nearest_in_camera = block.argmax(axis=1)
        for i in rows:
            if cameras[i] == camera:
                continue
            j = int(nearest_in_camera[i])
            if similarity[i, j] <= threshold:
                continue
            others = np.where(cameras == cameras[i], similarity[j], -np.inf)
            if int(others.argmax()) == i:
                pairs.append((float(similarity[i, j]), min(int(i), j), max(int(i), j)))
    return sorted(set(pairs), reverse=True)


def mine_identities(descriptors: np.ndarray, tracklets: Sequence[SiteTracklet], negatives: np.ndarray,
                    target_false_link: float) -> Mining:
    """Cross-camera pseudo-identities (see the module docstring, step 2) from unit tracklet
    descriptors `[N, D]`."""
    cameras = np.array([t.camera for t in tracklets])
    similarity = descriptors @ descriptors.T
    threshold = negative_threshold(similarity, negatives, target_false_link)
    count = int(np.triu(negatives, 1).sum())
    labels = np.full(len(tracklets), -1, dtype=np.int64)
    if threshold is None:
        return Mining(labels, None, count, 0, 0, 0, target_false_link)
    candidates = mutual_cross_camera_pairs(similarity, cameras, threshold)
    group = list(range(len(tracklets)))  # union-find over tracklets
    members = {i: {i} for i in range(len(tracklets))}

    def find(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    merged: list[tuple[float, int, int]] = []
    refused = 0
    for pair in candidates:
        a, b = find(pair[1]), find(pair[2])
        if a == b:
            continue
        if negatives[np.ix_(sorted(members[a]), sorted(members[b]))].any():
            refused += 1
            continue
        group[b] = a
        members[a] |= members.pop(b)
        merged.append(pair)
    roots = sorted(root for root, m in members.items() if len(m) > 1)
    for label, root in enumerate(roots):
        labels[sorted(members[root])] = label
    return Mining(labels, threshold, count, len(candidates), len(merged), refused, target_false_link, merged)


def held_out_matches(descriptors: np.ndarray, tracklets: Sequence[SiteTracklet], negatives: np.ndarray,
                     held_out: np.ndarray, target_false_link: float) -> dict[str, Any]:
    """The selection signal on held-out tracklets (see the module docstring, step 4), from unit
    tracklet descriptors `[N, D]`."""
    cameras = np.array([t.camera for t in tracklets])
    similarity = descriptors @ descriptors.T
    threshold = negative_threshold(similarity, negatives, target_false_link)
    multi_camera = [int(i) for i in held_out if (cameras != cameras[i]).any()]
    if threshold is None or not multi_camera:
        return {"score": 0.0, "matched": 0, "held_out": len(multi_camera), "threshold": threshold}
    pairs = mutual_cross_camera_pairs(similarity, cameras, threshold, members=np.array(multi_camera))
    matched = {i for _, a, b in pairs for i in (a, b) if i in set(multi_camera)}
    return {"score": len(matched) / len(multi_camera), "matched": len(matched), "held_out": len(multi_camera),
            "threshold": threshold}


def within_camera_auc(descriptors: np.ndarray, first: np.ndarray, second: np.ndarray,
                      negatives: np.ndarray) -> float | None:
    """P(a tracklet's two halves are more similar than two overlapping same-camera tracklets),
    from unit descriptors: the linker's free-label separation (within a camera), for the record."""
    if not len(first):
        return None
    genuine = (first * second).sum(1)
    similarity = descriptors @ descriptors.T
    impostor = similarity[np.triu(negatives, 1)]
    if impostor.size == 0:
        return None
    greater = (genuine[:, None] > impostor[None, :]).mean()
    ties = (genuine[:, None] == impostor[None, :]).mean()
    return float(greater + 0.5 * ties)


@dataclasses.dataclass
class Described:
    """One model's view of the site: unit tracklet descriptors `[N, D]` (camera-normalised), the
    camera statistics, unit descriptors of the tracklets' two halves (or None), and the
    camera-normalised clip descriptors `[C, D]` with each one's tracklet `[C]`."""

    descriptors: np.ndarray
    normalisation: CameraNormalisation
    halves: list[np.ndarray] | None
    clips: np.ndarray
    owners: np.ndarray


def _tracklet_descriptors(clips: np.ndarray, owners: np.ndarray, count: int) -> np.ndarray:
    """Unit tracklet descriptors: the normalised mean of each tracklet's unit clip descriptors
    (`storage.similarity.tracklet_descriptor`, for all tracklets at once)."""
    return unit(mean_per_tracklet(unit(clips), owners, count).astype(np.float32))


class _Clips:
    """Training clips: one random T-frame clip of a random tracklet of a pseudo-identity."""

    def __init__(self, records: list[TrackletRecord], model: KeyReID) -> None:
        self.dataset = ClipDataset(records, mode="train", T=model.config.num_frames, size=model.config.img_size)

    def loader(self, sampler: RandomIdentitySampler) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=0,
                                           collate_fn=collate_clips)


def camera_aware_negatives(cameras: torch.Tensor, associated: torch.Tensor) -> torch.Tensor:
    """`[B, B]` pairs that may be negatives: two tracklets of one camera (tracklet discrimination
    within a camera, as in TAUDL), or two cross-camera pseudo-identities. A tracklet no round has
    associated is never pushed away from another camera's tracklets: one of them may be the same
    person, the very pair adaptation must not train apart."""
    return (cameras[:, None] == cameras[None, :]) | (associated[:, None] & associated[None, :])


def metric_loss(model: KeyReID, out: Any, targets: torch.Tensor, allowed_negatives: torch.Tensor | None = None,
                global_weight: float = 0.75) -> torch.Tensor:
    """Batch-hard triplets on the global feature and on each part feature (KeyReIDLoss' metric
    terms, with its branch weighting)."""
    losses = []
    if out.global_feat is not None:
        losses.append((global_weight, batch_hard_triplet(out.global_feat, targets, allowed_negatives)))
    if out.part_feat is not None and model.num_parts:
        parts = torch.stack([batch_hard_triplet(out.part_feat[:, k], targets, allowed_negatives)
                             for k in range(model.num_parts)])
        losses.append((1.0 - global_weight if losses else 1.0, parts.mean()))
    if len(losses) == 1:
        return losses[0][1]
    return sum(weight * loss for weight, loss in losses)


class SiteAdapter:
    """The model, the site's tracklets and the rounds done so far; `run()` adapts to the end."""

    def __init__(self, config: AdaptConfig) -> None:
        self.config = config
        self.out = Path(config.out)
        self.device = torch.device(config.device)
        self.data_dir = self.out / "tracklets"
        self.state_path = self.out / "state.json"

    # ---- data ------------------------------------------------------------------------------
    def export(self) -> None:
        summary = export_tracklets(self.config.db, self.data_dir, min_clips=self.config.min_clips,
                                   progress=self.config.progress)
        for error in summary.errors:
            log.error("export: %s", error)
        log.info("export: %d new tracklets, %d already exported", summary.exported, summary.skipped_done)

    def load(self) -> None:
        dataset = load_tracklets(self.data_dir)
        self.records = [dataclasses.replace(r, camid=UNKNOWN_CAMERA) for r in dataset.train]
        self.tracklets = site_tracklets(read_manifest(self.data_dir))
        if len(self.tracklets) != len(self.records):
            raise RuntimeError(f"{self.data_dir}: manifest and frames disagree "
                               f"({len(self.tracklets)} vs {len(self.records)} tracklets)")
        cameras = sorted({t.camera for t in self.tracklets})
        if len(cameras) < 2:
            raise ValueError(f"{self.config.db}: tracklets of {len(cameras)} camera(s) {cameras}: site adaptation "
                             "learns across cameras and needs at least two")
        self.negatives = free_negatives(self.tracklets)
        rng = np.random.default_rng(self.config.seed)
        count = max(2, int(round(len(self.records) * self.config.held_out)))
        self.held_out = np.sort(rng.choice(len(self.records), size=count, replace=False))
        self.train_mask = np.ones(len(self.records), dtype=bool)
        self.train_mask[self.held_out] = False
        self.halves = self._halves()

    def _halves(self, clip_frames: int = 4) -> list[tuple[TrackletRecord, TrackletRecord, int]]:
        """(first half, second half, index) of every tracklet long enough for a clip in each."""
        return [(*temporal_halves(record), index) for index, record in enumerate(self.records)
                if len(record.frames) >= 2 * clip_frames]

    def dataset_summary(self) -> dict[str, Any]:
        per_camera: dict[str, int] = {}
        for t in self.tracklets:
            per_camera[t.camera] = per_camera.get(t.camera, 0) + 1
        return {"db": display_url(self.config.db), "cameras": sorted(per_camera), "tracklets": len(self.tracklets),
                "tracklets_per_camera": per_camera, "held_out": len(self.held_out),
                "free_negative_pairs": int(np.triu(self.negatives, 1).sum()),
                "runs": sorted({t.run_id for t in self.tracklets})}

    # ---- model -----------------------------------------------------------------------------
    def initial_model(self) -> tuple[KeyReID, str]:
        if self.config.source is None:
            model = build_model(self.config.model, seed=self.config.seed, **self.config.model_options)
            return model, f"{self.config.model} {self.config.model_options or ''} (untrained, seed {self.config.seed})"
        model, _ = load_model(self.config.source)
        return model, f"{self.config.source} (sha256 {file_digest(self.config.source)})"

    def describe(self, model: KeyReID, label: str) -> Described:
        """Encode every tracklet as the watcher and storage would: clip descriptors, standardised
        per camera by statistics fitted on all of them, unit tracklet descriptors."""
        features, owners = extract_clip_descriptors(model, self.records, self.device, batch_size=32,
                                                    progress=self.config.progress, desc=f"{label}: encode")
        cameras = np.array([t.camera for t in self.tracklets])
        normalisation = CameraNormalisation.fit(features, cameras[owners])
        standardised = normalisation.apply(features, cameras[owners])
        descriptors = _tracklet_descriptors(standardised, owners, len(self.records))
        halves = None
        if self.halves:
            halves = []
            for part in (0, 1):
                records = [h[part] for h in self.halves]
                clips, parts = extract_clip_descriptors(model, records, self.device, batch_size=32,
                                                        progress=self.config.progress, desc=f"{label}: halves")
                part_cameras = np.array([self.tracklets[h[2]].camera for h in self.halves])[parts]
                halves.append(_tracklet_descriptors(normalisation.apply(clips, part_cameras), parts, len(records)))
        return Described(descriptors, normalisation, halves, standardised, owners)

    def compact(self, described: Described) -> tuple[Described, Projection | None]:
        """The compact descriptors' projection (`reid.projection`) fitted on this site's
        camera-normalised clips, and the site as the encoder will then see it (None and the same
        view when the descriptor is compact already)."""
        if not needs_projection(described.clips.shape[1]):
            return described, None
        projection = Projection.fit(sample_clips(described.clips, MAX_FIT_CLIPS, self.config.seed))
        projected = _tracklet_descriptors(projection.apply(described.clips), described.owners, len(self.records))
        return dataclasses.replace(described, descriptors=projected), projection

    def figures(self, described: Described) -> dict[str, Any]:
        """Selection signal and within-camera separation of one candidate."""
        figures = held_out_matches(described.descriptors, self.tracklets, self.negatives, self.held_out,
                                   self.config.selection_false_link)
        figures["within_camera_auc"] = None if described.halves is None else within_camera_auc(
            described.descriptors[[h[2] for h in self.halves]], *described.halves,
            self.negatives[np.ix_([h[2] for h in self.halves], [h[2] for h in self.halves])])
        return figures

    def mine(self, described: Described, label: str, everyone: bool = False) -> Mining:
        """Pseudo-identities among the training tracklets (`everyone`: all of them); the target
        false-link rate is doubled (up to 10%) while fewer than P identities are found (a weak
        starting model)."""
        train = np.arange(len(self.records)) if everyone else np.flatnonzero(self.train_mask)
        descriptors = described.descriptors[train]
        tracklets = [self.tracklets[i] for i in train]
        negatives = self.negatives[np.ix_(train, train)]
        target = self.config.target_false_link
        while True:
            mining = mine_identities(descriptors, tracklets, negatives, target)
            if mining.identities >= self.config.batch_p or target >= 0.1:
                break
            target = min(0.1, 2 * target)
            log.info("%s: %d pseudo-identities; relaxing the mining target to %.0f%% false links",
                     label, mining.identities, 100 * target)
        labels = np.full(len(self.records), -1, dtype=np.int64)
        labels[train] = mining.labels
        return dataclasses.replace(mining, labels=labels)

    def train_round(self, model: KeyReID, mining: Mining, seconds: float, round_: int) -> dict[str, Any]:
        chosen = np.flatnonzero(self.train_mask)
        associated = mining.labels[chosen] >= 0
        # Associated tracklets take their pseudo-identity; every other one is its own (after them).
        labels = np.where(associated, mining.labels[chosen], mining.identities + np.arange(len(chosen)))
        records = [dataclasses.replace(self.records[i], pid=int(label)) for i, label in zip(chosen, labels, strict=True)]
        camera_names = sorted({t.camera for t in self.tracklets})
        record_camera = torch.tensor([camera_names.index(self.tracklets[i].camera) for i in chosen])
        record_associated = torch.from_numpy(associated)
        sampler = RandomIdentitySampler(records, P=self.config.batch_p, K=self.config.batch_k,
                                        seed=self.config.seed * 1000 + round_)
        clips = _Clips(records, model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)
        model.train()
        started = time.monotonic()
        steps, losses, epoch = 0, [], 0
        bar = tqdm(total=round(seconds), unit="s", desc=f"round {round_}/{self.config.rounds}",
                   disable=not self.config.progress, dynamic_ncols=True, leave=False)
        try:
            while time.monotonic() - started < seconds:
                sampler.set_epoch(epoch)
                for batch in clips.loader(sampler):
                    out = model(batch["frames"].to(self.device), batch["keypoints"].to(self.device),
                                batch["camid"].to(self.device))
                    owners = batch["tracklet"]
                    allowed = camera_aware_negatives(record_camera[owners], record_associated[owners])
                    loss = metric_loss(model, out, batch["pid"].to(self.device), allowed.to(self.device))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"round {round_}: non-finite loss after {steps} steps")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    steps += 1
                    losses.append(float(loss.detach()))
                    elapsed = time.monotonic() - started
                    bar.n = min(round(elapsed), bar.total)
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", steps=steps)
                    if elapsed >= seconds:
                        break
                epoch += 1
        finally:
            bar.close()
            model.eval()
        return {"steps": steps, "epochs": epoch, "seconds": time.monotonic() - started,
                "loss_first": float(np.mean(losses[:10])) if losses else None,
                "loss_last": float(np.mean(losses[-10:])) if losses else None,
                "train_tracklets": len(records), "associated_tracklets": int(associated.sum()),
                "pseudo_identities": mining.identities}

    # ---- the run ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {"config": dataclasses.asdict(self.config), "rounds": [], "initial": None}
        state = json.loads(self.state_path.read_text())
        saved = {k: v for k, v in state["config"].items() if k not in ("out", "device", "progress", "budget_minutes", "rounds")}
        current = {k: v for k, v in dataclasses.asdict(self.config).items() if k in saved}
        if saved != current:
            changed = sorted(k for k in saved if saved[k] != current.get(k))
            raise ValueError(f"{self.out} holds an adaptation with other settings ({', '.join(changed)}): "
                             "choose another --out or the same settings to resume it")
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2) + "\n")
        temporary.replace(self.state_path)

    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        state = self._state()
        self.export()
        self.load()
        model, source = self.initial_model()
        model = model.to(self.device).eval()
        done = len(state["rounds"])
        resumed = done and "selection" in state["rounds"][-1]
        described, described_round = None, 0  # the latest model's view, reused while it is current
        if state["initial"] is None or not resumed:
            described = self.describe(model, "start")
        if state["initial"] is None:
            state["initial"] = self.figures(described)
            self._save_state(state)
        log.info("start (%s): held-out cross-camera matches %.1f%%, within-camera AUC %s", source,
                 100 * state["initial"]["score"], state["initial"]["within_camera_auc"])
        if resumed:
            model, _ = load_model(self.out / f"round-{done}.pt")
            model = model.to(self.device).eval()
            described, described_round = self.describe(model, f"round {done}"), done
            log.info("resuming after round %d of %d", done, self.config.rounds)
        per_round = 60.0 * self.config.budget_minutes / max(self.config.rounds, 1)
        for round_ in range(done + 1, self.config.rounds + 1):
            if state["rounds"] and state["rounds"][-1].get("stopped"):
                break
            mining = self.mine(described, f"round {round_}")
            if mining.identities < MIN_IDENTITIES:
                log.warning("round %d: only %d cross-camera pseudo-identities (threshold %s): nothing to "
                            "learn from; stopping", round_, mining.identities, mining.threshold)
                state["rounds"].append({"round": round_, "mining": mining.summary(), "stopped": True})
                self._save_state(state)
                break
            log.info("round %d: %s", round_, mining.summary())
            self._write_labels(mining, round_)
            training = self.train_round(model, mining, per_round, round_)
            described, described_round = self.describe(model, f"round {round_}"), round_
            figures = self.figures(described)
            save_checkpoint(model, self.out / f"round-{round_}.pt", self._model_name(),
                            adaptation={"round": round_})
            state["rounds"].append({"round": round_, "mining": mining.summary(), "training": training,
                                    "selection": figures})
            self._save_state(state)
            log.info("round %d: held-out cross-camera matches %.1f%% (start %.1f%%), within-camera AUC %s",
                     round_, 100 * figures["score"], 100 * state["initial"]["score"], figures["within_camera_auc"])
        return self.finish(state, source, described, described_round)

    def _write_labels(self, mining: Mining, round_: int) -> None:
        """`round-N-identities.json`: the round's pseudo-identities as lists of tracklet ids."""
        identities: dict[int, list[int]] = {}
        for index in np.flatnonzero(mining.labels >= 0):
            identities.setdefault(int(mining.labels[index]), []).append(self.tracklets[index].tracklet_id)
        (self.out / f"round-{round_}-identities.json").write_text(
            json.dumps(sorted(identities.values()), indent=1) + "\n")

    def _model_name(self) -> str:
        if self.config.source is None:
            return self.config.model
        return str(read_checkpoint(self.config.source).get("model_name", self.config.model))

    def finish(self, state: dict[str, Any], source: str, latest: Described | None = None,
               latest_round: int = 0) -> dict[str, Any]:
        """Write adapted.pt (the selected candidate with its camera statistics and cross-camera
        labels) and results.json; `latest` is the last candidate's view, reused if selected."""
        candidates = [("start", 0, state["initial"])] + [
            (f"round {r['round']}", r["round"], r["selection"]) for r in state["rounds"] if "selection" in r]
        label, chosen_round, figures = max(candidates, key=lambda c: (c[2]["score"], c[1] == 0))
        if chosen_round == 0:
            model, _ = self.initial_model()
            log.warning("no round beat the starting model on held-out cross-camera matches: adapted.pt is the "
                        "starting model's weights with this site's camera statistics")
        else:
            model, _ = load_model(self.out / f"round-{chosen_round}.pt")
        model = model.to(self.device).eval()
        described = latest if latest is not None and latest_round == chosen_round else self.describe(model, label)
        described, projection = self.compact(described)
        # One person in two cameras, as the adapted model sees them (compact descriptors, as the
        # encoder will make them): the linker's cross-camera genuine labels
        # (tracking.linking.Calibrator), from associations among all tracklets.
        associations = self.mine(described, "cross-camera labels", everyone=True)
        cross_genuine = [float(np.sqrt(max(0.0, 2.0 - 2.0 * cosine))) for cosine, _, _ in associations.merged]
        adaptation = {
            "adapted_on": self.dataset_summary(), "source": source, "rounds": len(state["rounds"]),
            "selected": label, "selection_signal": SELECTION_SIGNAL,
            "before": state["initial"], "after": figures,
            "cross_camera_genuine": {"pairs": len(cross_genuine), "target_false_link": associations.target_false_link,
                                     "median_distance": float(np.median(cross_genuine)) if cross_genuine else None},
            "projection": None if projection is None else {"tag": projection.tag, "dim": projection.dim,
                                                            "fitted_on": projection.fitted_on},
        }
        extra = {} if projection is None else {PROJECTION_KEY: projection.to_payload()}
        path = save_checkpoint(model, self.out / "adapted.pt", self._model_name(), adaptation=adaptation,
                               training={"dataset": "site-adaptation", "git": git_commit()},
                               **{NORMALISATION_KEY: described.normalisation.to_payload(),
                                  CROSS_GENUINE_KEY: torch.tensor(cross_genuine, dtype=torch.float64), **extra})
        results = {**adaptation, "checkpoint": str(path), "config": dataclasses.asdict(self.config),
                   "per_round": state["rounds"], "git": git_commit()}
        (self.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return results


def adapt(config: AdaptConfig) -> dict[str, Any]:
    """Adapt (or resume adapting) as `config` says; returns what results.json holds."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    return SiteAdapter(config).run()


def build_parser() -> argparse.ArgumentParser:
    defaults = AdaptConfig(db="", out="")
    parser = argparse.ArgumentParser(prog="python -m training.adapt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="the watcher's database URL (opened read-only)")
    parser.add_argument("--out", required=True, help="adaptation folder (a rerun resumes it)")
    parser.add_argument("--from", dest="source", default=None, metavar="CHECKPOINT",
                        help="start from this checkpoint (e.g. trained on MARS or synthetic data); default: scratch")
    parser.add_argument("--model", default=defaults.model, choices=list_models(),
                        help="the variant trained from scratch when --from is not given")
    parser.add_argument("--model-opt", nargs="*", default=[], metavar="KEY=VALUE",
                        help="its reid.config.ModelConfig overrides, e.g. depth=4 img_size=[128,64]")
    parser.add_argument("--budget", type=float, default=defaults.budget_minutes, dest="budget_minutes",
                        metavar="MINUTES", help="training time over all rounds (encoding not counted)")
    parser.add_argument("--rounds", type=int, default=defaults.rounds,
                        help="mining + training rounds; 0: only this site's camera statistics and "
                             "cross-camera labels for the starting model (seconds, no training)")
    parser.add_argument("--held-out", type=float, default=defaults.held_out,
                        help="fraction of tracklets kept out of training, for model selection")
    parser.add_argument("--target-false-link", type=float, default=defaults.target_false_link,
                        help="associations: the share of free negatives that would pass the threshold")
    parser.add_argument("--selection-false-link", type=float, default=defaults.selection_false_link,
                        help="model selection: the same, on held-out tracklets (a few dozen free negatives "
                             "estimate a 10%% tail; a 1%% tail is just their maximum)")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-p", type=int, default=defaults.batch_p)
    parser.add_argument("--batch-k", type=int, default=defaults.batch_k)
    parser.add_argument("--min-clips", type=int, default=defaults.min_clips,
                        help="export only tracklets with at least this many stored clips")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("no_progress", "model_opt")}
    options["model_options"] = parse_key_values(args.model_opt)
    try:
        config = AdaptConfig(**options, progress=not args.no_progress)
        results = adapt(config)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    before, after = results["before"], results["after"]
    print(f"adapted checkpoint: {results['checkpoint']} (selected: {results['selected']})\n"
          f"held-out cross-camera matches: {100 * before['score']:.1f}% -> {100 * after['score']:.1f}%; "
          f"within-camera AUC: {before['within_camera_auc']} -> {after['within_camera_auc']}\n"
          f"use it: reid: {{checkpoint: {results['checkpoint']}}} in cams.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
