"""Transformer blocks evaluated for the [CLS] query only.

The global and part blocks feed nothing downstream but their [CLS] outputs, so a block
needs keys and values for every token while the query, attention output, projection and
MLP are needed for [CLS] alone. `cls_block` does exactly that work (about 2/12 of a full
block per token) and, given K additive attention biases, returns K [CLS] outputs that
share one set of keys/values: that is how KPS parts (log-prior biases) and stripes
(0 / -inf masks) run in one pass. `full_block_cls` is the straightforward computation kept
as the reference the tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block


def cls_block(block: Block, tokens: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[CLS] outputs of a pre-norm timm `Block`.

    tokens: `[B, N, C]` with [CLS] at index 0. bias: optional `[B, K, N]` additive logits on
    the [CLS]-to-token attention, one row per output. Returns `[B, K, C]` (K = 1 without bias).
    """
    attn = block.attn
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError("gated attention blocks are not supported")
    batch, num_tokens, channels = tokens.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    inner = heads * head_dim
    normed = block.norm1(tokens)
    weight, qkv_bias = attn.qkv.weight, attn.qkv.bias
    query = F.linear(normed[:, :1], weight[:inner], None if qkv_bias is None else qkv_bias[:inner])
    key_value = F.linear(normed, weight[inner:], None if qkv_bias is None else qkv_bias[inner:])
    query = query.view(batch, 1, heads, head_dim).transpose(1, 2)
    key, value = key_value.view(batch, num_tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    query, key = attn.q_norm(query), attn.k_norm(key)
    outputs = 1 if bias is None else bias.shape[1]
    mask = None if bias is None else bias[:, None].to(query.dtype)  # [B, 1, K, N]
    mixed = F.scaled_dot_product_attention(
        query.expand(batch, heads, outputs, head_dim), key, value,
        attn_mask=mask, dropout_p=attn.attn_drop.p if block.training else 0.0,
    )
    mixed = mixed.transpose(1, 2).reshape(batch, outputs, inner)
    mixed = attn.proj_drop(attn.proj(attn.norm(mixed)))
    hidden = tokens[:, :1] + block.drop_path1(block.ls1(mixed))
    return hidden + block.drop_path2(block.ls2(block.mlp(block.norm2(hidden))))


def full_block_cls(block: Block, tokens: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for `cls_block`: run the whole block once per bias row, keep [CLS]."""
    if bias is None:
        return block(tokens)[:, :1]
    rows = [block(tokens, attn_mask=bias[:, k, None, None, :].to(tokens.dtype))[:, 0] for k in range(bias.shape[1])]
    return torch.stack(rows, dim=1)
