"""The KeyRe-ID network: ViT trunk with camera embedding, global branch, local (part) branch.

Shapes: a batch of B clips of T frames; the trunk sees B*T images of n patches + [CLS] at
width D. The local branch works at width T*D: row i of `L_patch` is patch i in frames
1..T (the released code's raw `view` put four tokens of one frame in a row: defect 2).

Departures from the released code (DESIGN.md §4), each kept as an option where it matters:
- KPS `prior` (default): part importance enters as an additive log-prior on the
  [CLS]-to-patch attention logits, so it really steers the part token. `multiply` is the
  paper's literal row scaling, which the pre-norm block's LayerNorm erases (defect 1).
- TCSS permutes patch rows and their importance together, so patch i's weight stays on
  patch i's features (defect 2). By default (`tcss_mode="random"`) it is the paper's
  training-time perturbation: a random circular shift of each patch's frames, none at inference.
- Only [CLS] outputs of the global and part blocks are computed (`blocks.cls_block`),
  with keys/values shared by all parts; `reference=True` runs the straightforward version.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block

from .blocks import cls_block, full_block_cls
from .config import ModelConfig
from .heatmaps import part_patch_importance
from .keypoints import BODY_PARTS
from .pretrained import LoadReport, load_backbone_weights

log = logging.getLogger(__name__)


@dataclass
class ReIDOutput:
    """Everything the losses and the descriptor need; a branch that is off leaves its fields None."""

    global_feat: torch.Tensor | None = None  # [B, D] before the BN neck (triplet / center losses)
    global_bn: torch.Tensor | None = None  # [B, D] after the BN neck (descriptor)
    global_logits: torch.Tensor | None = None  # [B, classes]
    temporal_attention: torch.Tensor | None = None  # [B, T] softmax weights
    part_feat: torch.Tensor | None = None  # [B, K, T*D]
    part_bn: torch.Tensor | None = None  # [B, K, T*D]
    part_logits: torch.Tensor | None = None  # [B, K, classes]


class BNNeck(nn.Module):
    """BatchNorm with a frozen bias, then a bias-free classifier (the BNNeck of strong re-id baselines)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.classifier = nn.Linear(dim, num_classes, bias=False) if num_classes > 0 else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed = self.bn(features)
        return normed, None if self.classifier is None else self.classifier(normed)


def create_backbone(config: ModelConfig, pretrained: str | Path | None = None) -> nn.Module:
    """A timm ViT at the config's input size (and patch stride), with `pretrained` weights loaded
    strictly by `reid.pretrained.load_backbone_weights` (a file, or `timm:NAME` to download).

    The load's `LoadReport` rides along as `backbone.pretrained_report` (None without weights)."""
    options: dict = dict(img_size=config.img_size, num_classes=0, global_pool="", drop_path_rate=config.drop_path)
    if config.depth is not None:
        options["depth"] = config.depth
    backbone = timm.create_model(config.backbone, **options)
    if backbone.num_prefix_tokens != 1 or getattr(backbone, "no_embed_class", False):
        raise ValueError(f"{config.backbone}: expected a ViT with one [CLS] token and class position embedding")
    if config.stride != config.patch_size:
        _use_overlapping_patches(backbone, config)
    # After the stride change, so the file's position embedding is resampled once, to the final grid.
    backbone.pretrained_report = None if pretrained is None else load_backbone_weights(backbone, pretrained)
    return backbone


def _use_overlapping_patches(backbone: nn.Module, config: ModelConfig) -> None:
    """Switch the patch embedding to an overlapping stride and resample the position embedding."""
    embed = backbone.patch_embed
    old_grid = tuple(embed.grid_size)
    embed.proj.stride = (config.stride, config.stride)
    embed.grid_size = config.grid_size
    embed.num_patches = config.num_patches
    backbone.pos_embed = nn.Parameter(
        resample_abs_pos_embed(backbone.pos_embed.data, new_size=config.grid_size, old_size=old_grid, num_prefix_tokens=1)
    )


class KeyReID(nn.Module):
    """KeyRe-ID (and, with `local='stripes'`, VID-Trans-ReID) for clips `[B, T, 3, H, W]`."""

    def __init__(self, config: ModelConfig, pretrained: str | Path | None = None) -> None:
        super().__init__()
        self.config = config
        backbone = create_backbone(config, pretrained)
        if tuple(backbone.patch_embed.grid_size) != config.grid_size:
            raise ValueError(f"{config.backbone}: patch grid {backbone.patch_embed.grid_size} != config {config.grid_size}")
        width = backbone.embed_dim
        self.embed_dim = width
        backbone_heads = backbone.blocks[-1].attn.num_heads
        # The trunk is the backbone minus its last block; that block (and the final norm) seed the
        # global branch, as in TransReID / VID-Trans-ReID, so pretrained weights keep their meaning.
        if config.use_global:
            self.global_block = copy.deepcopy(backbone.blocks[-1])
            self.global_norm = backbone.norm
        del backbone.blocks[-1]
        backbone.norm = nn.Identity()
        self.backbone = backbone
        self.camera_embed = nn.Parameter(torch.zeros(config.num_cameras, 1, width))
        trunc_normal_(self.camera_embed, std=0.02)

        self.part_names: tuple[str, ...] = ()
        if config.use_global:
            self.temporal_score = nn.Linear(width, config.attention_dim)
            self.temporal_conv = nn.Conv1d(config.attention_dim, 1, kernel_size=3, padding=1)
            self.global_neck = BNNeck(width, config.num_classes)
        if config.local != "none":
            self.part_names = {
                "keypoints": tuple(BODY_PARTS),
                "stripes": tuple(f"stripe{i + 1}" for i in range(config.num_stripes)),
                "whole": ("body",),
            }[config.local]
            part_width = config.num_frames * width
            heads = config.part_heads or backbone_heads
            if part_width % heads:
                raise ValueError(f"part width {part_width} is not divisible by part_heads={heads}")
            self.part_block = Block(part_width, heads, mlp_ratio=4.0, qkv_bias=True, drop_path=config.drop_path)
            self.part_norm = nn.LayerNorm(part_width, eps=1e-6)
            self.part_necks = nn.ModuleList(BNNeck(part_width, config.num_classes) for _ in self.part_names)
            self.part_block.apply(_init_linear)
            self.register_buffer("tcss_order", _tcss_row_order(config), persistent=False)
        report: LoadReport | None = vars(backbone).pop("pretrained_report", None)
        if report is not None and report.extras:
            self._load_pretrained_extras(report)
        # What was loaded (format, tensor count, ignored heads), without holding on to the tensors.
        self.pretrained_report = None if report is None else dataclasses.replace(report, extras={})

    def _load_pretrained_extras(self, report: LoadReport) -> None:
        """Non-backbone tensors of the source (the rest of one of our models, TransReID's camera
        embedding) wherever name and shape fit; classifiers, sized by the source's label set, never."""
        own = self.state_dict()
        usable = {k: v for k, v in report.extras.items()
                  if k in own and own[k].shape == v.shape and ".classifier." not in k}
        self.load_state_dict(usable, strict=False)
        skipped = sorted(set(report.extras) - set(usable))
        log.info("%s: also initialised %d non-backbone tensors%s", report.source, len(usable),
                 f"; left at their initialisation: {', '.join(skipped[:12])}" if skipped else "")

    @property
    def num_parts(self) -> int:
        return len(self.part_names)

    @property
    def descriptor_dim(self) -> int:
        global_dim = self.embed_dim if self.config.use_global else 0
        return global_dim + self.num_parts * self.config.num_frames * self.embed_dim

    def trunk(self, frames: torch.Tensor, camera_ids: torch.Tensor) -> torch.Tensor:
        """Token features `[B, T, n+1, D]` (Eq. 1-3): patches + [CLS] + position + weighted camera embedding."""
        batch, num_frames = frames.shape[:2]
        images = frames.flatten(0, 1)
        tokens = self.backbone.patch_embed(images)
        cls = self.backbone.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.backbone.pos_embed
        tokens = tokens + self.config.camera_weight * self._camera_embedding(camera_ids).repeat_interleave(num_frames, 0)
        tokens = self.backbone.norm_pre(self.backbone.pos_drop(tokens))
        tokens = self.backbone.blocks(tokens)
        return tokens.view(batch, num_frames, *tokens.shape[1:])

    def _camera_embedding(self, camera_ids: torch.Tensor) -> torch.Tensor:
        """`[B, 1, D]`; a negative id means "camera unknown to this model" and gets the mean embedding."""
        if (camera_ids >= self.config.num_cameras).any():
            raise ValueError(f"camera id {int(camera_ids.max())} >= num_cameras={self.config.num_cameras}")
        known = self.camera_embed[camera_ids.clamp(min=0)]
        unknown = self.camera_embed.mean(0, keepdim=True).expand_as(known)
        return torch.where((camera_ids < 0)[:, None, None], unknown, known)

    def forward(
        self,
        frames: torch.Tensor,
        keypoints: torch.Tensor | None = None,
        camera_ids: torch.Tensor | None = None,
        reference: bool = False,
    ) -> ReIDOutput:
        """frames `[B, T, 3, H, W]` normalised; keypoints `[B, T, 17, 3]` in input pixels (needed by
        `local='keypoints'`); camera ids `[B]` (default: unknown). `reference=True` computes every
        token of the global/part blocks (slow; the tests' ground truth)."""
        batch, num_frames = frames.shape[:2]
        if num_frames != self.config.num_frames:
            raise ValueError(f"expected clips of {self.config.num_frames} frames, got {num_frames}")
        if camera_ids is None:
            camera_ids = torch.full((batch,), -1, dtype=torch.long, device=frames.device)
        features = self.trunk(frames, camera_ids)
        out = ReIDOutput()
        if self.config.use_global:
            self._global_branch(features, out, reference)
        if self.config.local != "none":
            self._local_branch(features, keypoints, out, reference)
        return out

    def _global_branch(self, features: torch.Tensor, out: ReIDOutput, reference: bool) -> None:
        batch, num_frames = features.shape[:2]
        frame_tokens = features.flatten(0, 1)
        block_cls = full_block_cls if reference else cls_block
        cls = self.global_norm(block_cls(self.global_block, frame_tokens)[:, 0]).view(batch, num_frames, -1)
        scores = F.relu(self.temporal_score(cls))  # [B, T, A]: the released 1x1 conv D->256
        scores = F.relu(self.temporal_conv(scores.transpose(1, 2))).squeeze(1)  # [B, T]
        attention = scores.softmax(dim=1)
        out.temporal_attention = attention
        out.global_feat = (attention[..., None] * cls).sum(1)
        out.global_bn, out.global_logits = self.global_neck(out.global_feat)

    def _local_branch(self, features: torch.Tensor, keypoints: torch.Tensor | None, out: ReIDOutput, reference: bool) -> None:
        batch, num_frames, num_tokens, width = features.shape
        cls = features[:, :, 0].reshape(batch, 1, num_frames * width)  # L_cls
        patches = features[:, :, 1:].transpose(1, 2)  # [B, n, T, D]
        if self.config.tcss and (self.training or self.config.tcss_mode == "fixed"):
            # Temporal circular shift of each patch's frames: random per clip and patch while
            # training (the paper's TCSS perturbation), or by patch index i mod T (`fixed`).
            patches = patches.gather(2, self._temporal_shift_index(patches, random=self.config.tcss_mode == "random"))
        rows = patches.reshape(batch, num_tokens - 1, num_frames * width)  # L_patch: row i = patch i over time
        order = self.tcss_order
        rows = rows[:, order]
        importance = None
        if self.config.local == "keypoints":
            if keypoints is None:
                raise ValueError("local='keypoints' needs keypoints [B, T, 17, 3]")
            importance = self.part_importance(keypoints)[:, :, order]  # follows the TCSS row order
        out.part_feat = self.part_norm(self.part_tokens(cls, rows, importance, reference))
        normed, logits = zip(*(neck(out.part_feat[:, k]) for k, neck in enumerate(self.part_necks)))
        out.part_bn = torch.stack(normed, dim=1)
        if logits[0] is not None:
            out.part_logits = torch.stack(logits, dim=1)

    @staticmethod
    def _temporal_shift_index(patches: torch.Tensor, random: bool) -> torch.Tensor:
        """gather index `[B, n, T, D]` rotating patch i's T frames by its shift (random or i mod T)."""
        batch, count, num_frames = patches.shape[:3]
        if random:
            shift = torch.randint(0, num_frames, (batch, count, 1), device=patches.device)
        else:
            shift = (torch.arange(count, device=patches.device) % num_frames)[None, :, None].expand(batch, -1, -1)
        source = (torch.arange(num_frames, device=patches.device) - shift) % num_frames
        return source[..., None].expand_as(patches)

    def part_tokens(
        self, cls: torch.Tensor, rows: torch.Tensor, importance: torch.Tensor | None = None, reference: bool = False
    ) -> torch.Tensor:
        """Part [CLS] outputs `[B, K, T*D]` of the shared part block from L_cls `[B, 1, T*D]`,
        L_patch rows `[B, n, T*D]` and (KPS only) part importance `[B, K, n]` in the same row order."""
        block_cls = full_block_cls if reference else cls_block
        tokens = torch.cat([cls, rows], dim=1)
        mode = self.config.local
        if mode == "whole":
            return block_cls(self.part_block, tokens)
        if mode == "stripes":
            stripes = rows.chunk(self.num_parts, dim=1)
            if reference:
                return torch.cat([full_block_cls(self.part_block, torch.cat([cls, s], dim=1)) for s in stripes], dim=1)
            return cls_block(self.part_block, tokens, _stripe_bias(rows, self.num_parts))
        if self.config.kps_mode == "prior":
            return block_cls(self.part_block, tokens, self._log_prior(importance))
        weighted = torch.cat([cls.expand(-1, self.num_parts, -1)[:, :, None], rows[:, None] * importance[..., None]], dim=2)
        flat = weighted.flatten(0, 1)  # [B*K, n+1, T*D]: the paper's literal product, one sequence per part
        return block_cls(self.part_block, flat).view(rows.shape[0], self.num_parts, -1)

    def part_importance(self, keypoints: torch.Tensor) -> torch.Tensor:
        """Clip-level part-to-patch importance `[B, 6, n]` (patch-grid pooled part heatmaps)."""
        c = self.config
        return part_patch_importance(keypoints, c.img_size, c.patch_size, c.stride, c.heatmap_sigma, c.keypoint_threshold,
                                     maps=c.part_maps)

    def _log_prior(self, importance: torch.Tensor) -> torch.Tensor:
        """`[B, K, n+1]` attention bias: log of the importance relative to the part's peak; 0 for [CLS].

        A part no frame sees has no evidence, so its prior is flat (plain attention)."""
        peak = importance.amax(dim=-1, keepdim=True)
        relative = torch.where(peak > 0, importance / peak.clamp(min=1e-12), torch.ones_like(importance))
        prior = torch.log(relative + self.config.prior_floor)
        return F.pad(prior, (1, 0), value=0.0)

    def descriptor(self, out: ReIDOutput) -> torch.Tensor:
        """Inference descriptor: concat(global BN feature, each part BN feature / sqrt(K) or / K).

        BN features have about unit variance per dimension, so with / sqrt(K) the K parts
        together weigh as much as one part, whatever K (`part_scale`, see ModelConfig)."""
        pieces = []
        if out.global_bn is not None:
            pieces.append(out.global_bn)
        if out.part_bn is not None:
            divisor = self.num_parts if self.config.part_scale == "k" else self.num_parts ** 0.5
            pieces.append(out.part_bn.flatten(1) / divisor)
        return torch.cat(pieces, dim=1)


def _tcss_row_order(config: ModelConfig) -> torch.Tensor:
    """Patch-shuffle permutation of the n patch rows (identity without TCSS).

    As in VID-Trans-ReID: rotate the rows by `tcss_shift`, then interleave `tcss_groups`
    groups (a ShuffleNet channel shuffle over rows). Attention over a set of rows does not
    care about their order, so for KPS parts this changes nothing; it decides which patches
    land in which stripe in `stripes` mode.
    """
    count = config.num_patches
    order = torch.arange(count)
    if not config.tcss or (config.tcss_mode == "random" and config.local != "stripes"):
        return order  # the row shuffle only ever matters for stripes (random TCSS: skip the no-op)
    order = order.roll(-config.tcss_shift)
    groups = config.tcss_groups
    if count % groups:
        raise ValueError(f"{count} patches cannot be shuffled in {groups} groups")
    return order.view(groups, count // groups).t().reshape(-1)


def _stripe_bias(rows: torch.Tensor, num_stripes: int) -> torch.Tensor:
    """`[B, S, n+1]` 0 / -inf masks so [CLS] attends to itself and its stripe's rows only."""
    batch, count = rows.shape[:2]
    members = torch.arange(count, device=rows.device) // -(-count // num_stripes)
    allowed = members[None, :] == torch.arange(num_stripes, device=rows.device)[:, None]
    allowed = F.pad(allowed, (1, 0), value=True)
    bias = torch.zeros(allowed.shape, dtype=rows.dtype, device=rows.device).masked_fill(~allowed, float("-inf"))
    return bias.expand(batch, -1, -1)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
