"""Small models for the whole-model rewrite tests: transformers models from tiny random configs (no
downloads), nanoGPT-style blocks (SDPA and hand-written attention with a ``tril`` buffer), and
``nn.MultiheadAttention``. Every model has dropout 0, so the compiled and oracle runs are comparable."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 97
SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "attention_dropout": 0.0,
}


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padding(batch: int, length: int, pads: tuple[int, ...]) -> torch.Tensor:
    """An attention_mask (B, T) of ones with ``pads[b]`` zeros on the left of row b."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask


def _hf(config_class: str, model_class: str, **config) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config_class)(**config)
    cfg._attn_implementation = "sdpa"
    return getattr(transformers, model_class)(cfg)


def llama() -> nn.Module:
    return _hf("LlamaConfig", "LlamaForCausalLM", **SMALL, num_key_value_heads=2)


def qwen2() -> nn.Module:
    return _hf("Qwen2Config", "Qwen2ForCausalLM", **SMALL, num_key_value_heads=2)


def mistral(window: int = 8) -> nn.Module:
    return _hf("MistralConfig", "MistralForCausalLM", **SMALL, num_key_value_heads=2, sliding_window=window)


def starcoder2(window: int = 8) -> nn.Module:
    extra = {"residual_dropout": 0.0, "embedding_dropout": 0.0, "sliding_window": window}
    return _hf("Starcoder2Config", "Starcoder2ForCausalLM", **SMALL, num_key_value_heads=2, **extra)


def _gpt_config(**extra) -> dict:
    dropouts = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB, "n_positions": 128, **dropouts, **extra}


def gpt2() -> nn.Module:
    return _hf("GPT2Config", "GPT2LMHeadModel", **_gpt_config())


def gpt_bigcode() -> nn.Module:
    return _hf("GPTBigCodeConfig", "GPTBigCodeForCausalLM", **_gpt_config(multi_query=True))


def bert() -> nn.Module:
    config = {k: v for k, v in SMALL.items() if k not in ("attention_dropout",)}
    return _hf("BertConfig", "BertModel", **config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class NanoBlock(nn.Module):
    """nanoGPT's block: causal self-attention (SDPA, or hand-written with a ``tril`` buffer) and an MLP."""

    def __init__(self, dim: int, heads: int, block_size: int, hand_written: bool) -> None:
        super().__init__()
        self.heads, self.hand_written = heads, hand_written
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.attn_dropout = nn.Dropout(0.0)
        if hand_written:
            tril = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
            self.register_buffer("bias", tril)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.hand_written:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, hand_written: bool = False, dim: int = 32, layers: int = 2, block_size: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.wpe = nn.Embedding(VOCAB, dim), nn.Embedding(block_size, dim)
        self.h = nn.ModuleList(NanoBlock(dim, 4, block_size, hand_written) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(dim), nn.Linear(dim, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class MultiheadModel(nn.Module):
    """``nn.MultiheadAttention`` self-attention with a causal mask built in the forward (``triu`` of -inf),
    and optionally a key padding mask."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        y, _ = self.attn(x, x, x, attn_mask=causal, key_padding_mask=key_padding_mask)
        return self.out(y)
