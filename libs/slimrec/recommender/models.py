"""Sequential recommenders written for this project: SASRec, GRU4Rec, SR-GNN, plus SLIM's fusions.

Item side (``ItemEncoder``): ``z_i = id_i`` (ids only) or, with item text,
``z_i = g_f([g_l(text_i); id_i])`` (both g linear), as in SLIM.

User side (``RationaleFusion``) over the backbone's sequence encoding
``seq_enc_u``:

* ``concat`` (the paper): ``s_u = g_f([g_l(rationale_u); seq_enc_u])``.
* ``gated`` (can only help): ``s_u = seq_enc_u + gate * g_l(dropout(rationale_u))``
  with ``gate`` a per-dimension vector initialised at zero, so a model
  warm-started from the text variant starts exactly where that model was.
  Users without a rationale get ``s_u = seq_enc_u``.

ID-agnostic (``TextMatching``): ``z_i = g_t(text_i)``, ``s_u = g_t(rationale_u)``,
score = scaled cosine; ``g_t`` starts as the identity, so before training it
ranks by plain cosine between rationale and item text vectors.

Shapes: ``B`` batch, ``L`` max sequence length, ``d`` hidden size, ``D`` text
vector size, ``N = n_items + 1`` (index 0 is padding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slimrec.torch_ops import Dropout, dropout


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with an additive mask; in CPU training with dropout, the same
    computation written out, so the weights' dropout is :func:`dropout` (torch's CPU kernels have no
    dropout and fall back to a math path that draws it with ``bernoulli_``)."""
    if p <= 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    w = torch.softmax((q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5) + mask, dim=-1)
    return dropout(w, p) @ v


def causal_attention_mask(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) additive mask for padded id rows ``ids`` (B, L): causal and key-not-padding; every query
    may see itself, so fully padded rows stay finite. Additive, not boolean: the CPU kernels run it faster."""
    L = ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
    allowed = (causal[None] & (ids > 0)[:, None, :]) | torch.eye(L, dtype=torch.bool, device=ids.device)[None]
    return torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill_(~allowed, float("-inf"))[:, None]


class ItemEncoder(nn.Module):
    def __init__(self, n_items: int, d: int, text: torch.Tensor | None = None):
        super().__init__()
        self.id_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        nn.init.xavier_normal_(self.id_emb.weight)
        with torch.no_grad():
            self.id_emb.weight[0].zero_()
        self.use_text = text is not None
        if text is not None:
            self.register_buffer("text", text.float(), persistent=False)  # (N, D), from the data, not the checkpoint
            self.g_l = nn.Linear(text.shape[1], d)
            self.g_f = nn.Linear(2 * d, d)
            # g_f starts as [0 | I]: z_i = id_i, exactly the ids-only model, and the text part is learned
            # from there (a random g_f rescales the id embeddings and made SASRec worse than ids alone).
            with torch.no_grad():
                self.g_f.weight.zero_()
                self.g_f.weight[:, d:].copy_(torch.eye(d))
                self.g_f.bias.zero_()

    def forward(self, ids: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """(...,) item indices -> (..., d); with ``table`` (N, d) from :meth:`all_items`, a plain lookup."""
        if table is not None:
            # index_select: its backward (index_add) ran 1.8x faster on CPU than that of table[ids] (index_put)
            return table.index_select(0, ids.reshape(-1)).view(*ids.shape, table.shape[-1])
        e = self.id_emb(ids)
        if not self.use_text:
            return e
        return self.g_f(torch.cat([self.g_l(self.text[ids]), e], dim=-1))

    @property
    def n_rows(self) -> int:
        return self.id_emb.num_embeddings

    def all_items(self) -> torch.Tensor:
        """(N, d) every item's vector (row 0 is padding: never a candidate)."""
        return self(torch.arange(self.id_emb.num_embeddings, device=self.id_emb.weight.device))


# --------------------------------------------------------------------------------------------- backbones
class SASRec(nn.Module):
    """Self-attentive sequential recommendation (Kang & McAuley 2018), shaped like SASRec.pytorch.

    Pre-LN causal self-attention blocks; queries from the layer-normed input, keys/values from the raw
    input; point-wise feed-forward with residual; output (B, L, d), one state per position.
    """

    per_position = True

    def __init__(self, d: int, max_len: int, num_blocks: int, num_heads: int, dropout: float):
        super().__init__()
        self.d, self.heads = d, num_heads
        self.pos_emb = nn.Embedding(max_len, d)
        self.emb_dropout = Dropout(dropout)
        self.attn_ln = nn.ModuleList([nn.LayerNorm(d, eps=1e-8) for _ in range(num_blocks)])
        self.q_proj = nn.ModuleList([nn.Linear(d, d) for _ in range(num_blocks)])
        self.kv_proj = nn.ModuleList([nn.Linear(d, 2 * d) for _ in range(num_blocks)])
        self.out_proj = nn.ModuleList([nn.Linear(d, d) for _ in range(num_blocks)])
        self.ffn_ln = nn.ModuleList([nn.LayerNorm(d, eps=1e-8) for _ in range(num_blocks)])
        self.ffn = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(d, d), Dropout(dropout), nn.ReLU(), nn.Linear(d, d), Dropout(dropout))
                for _ in range(num_blocks)
            ]
        )
        self.attn_dropout = dropout
        self.last_ln = nn.LayerNorm(d, eps=1e-8)
        for name, p in self.named_parameters():
            if p.dim() > 1 and "ln" not in name:
                nn.init.xavier_normal_(p)

    def forward(self, ids: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        B, L = ids.shape
        mask = (ids > 0).unsqueeze(-1).float()  # (B, L, 1)
        pos = torch.arange(L, device=ids.device)
        x = emb * math.sqrt(self.d) + self.pos_emb(pos)[None]
        x = self.emb_dropout(x) * mask
        attn_mask = causal_attention_mask(ids, x.dtype)
        h, dh = self.heads, self.d // self.heads
        p = self.attn_dropout if self.training else 0.0
        for i in range(len(self.q_proj)):
            q_in = self.attn_ln[i](x)
            q = self.q_proj[i](q_in).view(B, L, h, dh).transpose(1, 2)
            k, v = self.kv_proj[i](x).view(B, L, 2, h, dh).permute(2, 0, 3, 1, 4)
            a = attention(q, k, v, attn_mask, p)
            x = q_in + self.out_proj[i](a.transpose(1, 2).reshape(B, L, self.d))
            y = self.ffn_ln[i](x)
            x = (y + self.ffn[i](y)) * mask
        return self.last_ln(x)


class GRU4Rec(nn.Module):
    """GRU4Rec (Hidasi et al. 2016) in its sequential-recommendation form: one state per position."""

    per_position = True

    def __init__(self, d: int, num_layers: int, dropout: float):
        super().__init__()
        self.emb_dropout = Dropout(dropout)
        self.gru = nn.GRU(d, d, num_layers=num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0)
        self.out = nn.Linear(d, d)

    def forward(self, ids: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.emb_dropout(emb) * (ids > 0).unsqueeze(-1).float()
        y, _ = self.gru(x)
        return self.out(y)


class SRGNN(nn.Module):
    """SR-GNN (Wu et al. 2019): a gated graph network over each sequence's item graph.

    Nodes are a row's distinct items, edges its consecutive transitions (in/out adjacency, row-normalised);
    the output is one state per row (B, d): ``W3 [s_last; sum_i alpha_i h_i]``. Graphs are built in
    batch with tensor ops (sort + cumsum for node ids, scatter for edges): no Python loop over rows.
    """

    per_position = False

    def __init__(self, d: int, steps: int, dropout: float):
        super().__init__()
        self.steps = steps
        self.w_in = nn.Linear(d, d)
        self.w_out = nn.Linear(d, d)
        self.gru = nn.GRUCell(2 * d, d)
        self.w1 = nn.Linear(d, d)
        self.w2 = nn.Linear(d, d)
        self.q = nn.Linear(d, 1, bias=False)
        self.w3 = nn.Linear(2 * d, d)
        self.dropout = Dropout(dropout)
        stdv = 1.0 / math.sqrt(d)
        for p in self.parameters():
            nn.init.uniform_(p, -stdv, stdv)

    @staticmethod
    def graph(ids: torch.Tensor):
        """alias (B, L) node index of each position; node_pos (B, L) a position holding each node;
        a_in, a_out (B, L, L) normalised adjacency; node_mask (B, L)."""
        B, L = ids.shape
        srt, order = ids.sort(dim=1)
        new = torch.ones_like(srt, dtype=torch.bool)
        new[:, 1:] = srt[:, 1:] != srt[:, :-1]
        node_sorted = new.long().cumsum(1) - 1  # node id of each sorted entry
        alias = torch.empty_like(node_sorted).scatter_(1, order, node_sorted)
        node_item = torch.zeros_like(ids).scatter_(1, node_sorted, srt)  # (B, L) item of each node
        node_mask = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, node_sorted, srt > 0)
        node_pos = torch.zeros_like(ids).scatter_(1, alias, torch.arange(L, device=ids.device).expand(B, L))
        valid = (ids[:, :-1] > 0) & (ids[:, 1:] > 0)
        src, dst = alias[:, :-1], alias[:, 1:]
        flat = (src * L + dst).masked_fill(~valid, L * L)  # invalid edges go to a dump slot
        buf = torch.zeros(B, L * L + 1, device=ids.device)
        buf.scatter_(1, flat, 1.0)  # duplicate edges count once, as in SR-GNN
        a = buf[:, : L * L].view(B, L, L)
        a_out = a / a.sum(2, keepdim=True).clamp_min(1)
        a_in = a.transpose(1, 2)
        a_in = a_in / a_in.sum(2, keepdim=True).clamp_min(1)
        return alias, node_item, node_mask, node_pos, a_in, a_out

    def forward(self, ids: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        B, L = ids.shape
        alias, _, node_mask, node_pos, a_in, a_out = self.graph(ids)
        # node embeddings: the embedding at one position holding the node
        h = torch.gather(emb, 1, node_pos[..., None].expand(-1, -1, emb.shape[-1])) * node_mask[..., None]
        h = self.dropout(h)
        for _ in range(self.steps):
            m = torch.cat([a_in @ self.w_in(h), a_out @ self.w_out(h)], dim=-1)
            h = self.gru(m.reshape(B * L, -1), h.reshape(B * L, -1)).view(B, L, -1)
        seq_h = torch.gather(h, 1, alias[..., None].expand(-1, -1, h.shape[-1]))  # (B, L, d)
        pos_mask = ids > 0
        last = seq_h[:, -1]  # right-aligned: the most recent item
        alpha = self.q(torch.sigmoid(self.w1(last)[:, None] + self.w2(seq_h)))  # (B, L, 1)
        s_g = (alpha * seq_h * pos_mask[..., None]).sum(1)
        return self.w3(torch.cat([last, s_g], dim=-1))


def make_backbone(name: str, cfg) -> nn.Module:
    if name == "sasrec":
        return SASRec(cfg.hidden_dim, cfg.max_len, cfg.num_blocks, cfg.num_heads, cfg.dropout)
    if name == "gru4rec":
        return GRU4Rec(cfg.hidden_dim, cfg.gru_layers, cfg.dropout)
    if name == "srgnn":
        return SRGNN(cfg.hidden_dim, cfg.srgnn_steps, cfg.dropout)
    raise ValueError(f"unknown backbone {name!r}")


# ------------------------------------------------------------------------------------------- fusions
class RationaleFusion(nn.Module):
    def __init__(self, text_dim: int, d: int, mode: str, dropout: float):
        super().__init__()
        self.mode = mode
        self.g_l = nn.Linear(text_dim, d)
        self.dropout = Dropout(dropout)
        if mode == "concat":
            self.g_f = nn.Linear(2 * d, d)
        elif mode == "gated":
            self.gate = nn.Parameter(torch.zeros(d))
        else:
            raise ValueError(f"unknown rationale fusion {mode!r}")

    def forward(self, seq: torch.Tensor, r: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """seq (B, L, d) or (B, d); r (B, D); present (B,) or (B, L) float 0/1 -> same shape as seq."""
        rv = self.g_l(self.dropout(r))  # (B, d)
        if seq.dim() == 3:
            rv = rv[:, None, :]
            pres = present if present.dim() == 2 else present[:, None].expand(-1, seq.shape[1])
        else:
            pres = present
        pres = pres[..., None]
        if self.mode == "concat":
            # the paper: users without a rationale get g_l(0), a learned constant
            rv = rv.expand_as(seq) * pres
            return self.g_f(torch.cat([rv, seq], dim=-1))
        return seq + self.gate * rv * pres


class SeqRecModel(nn.Module):
    """Backbone + item encoder + optional rationale fusion + optional learned weight on a score prior."""

    def __init__(self, backbone: str, n_items: int, cfg, text=None, rationale_dim: int | None = None,
                 joint_prior: bool = False):
        super().__init__()
        self.items = ItemEncoder(n_items, cfg.hidden_dim, text)
        self.backbone = make_backbone(backbone, cfg)
        self.per_position = self.backbone.per_position
        self.fusion = (
            RationaleFusion(rationale_dim, cfg.hidden_dim, cfg.rationale_fusion, cfg.rationale_dropout)
            if rationale_dim
            else None
        )
        self.prior_weight = nn.Parameter(torch.tensor(1.0)) if joint_prior else None

    def user(self, ids: torch.Tensor, r=None, present=None, table=None) -> torch.Tensor:
        """(B, L) right-aligned inputs -> (B, L, d) per position, or (B, d) for SR-GNN."""
        out = self.backbone(ids, self.items(ids, table))
        if self.fusion is not None and r is not None:
            out = self.fusion(out, r, present)
        return out

    def user_last(self, ids, r=None, present=None) -> torch.Tensor:
        """(B, d): the state after the most recent item."""
        out = self.user(ids, r, present)
        return out[:, -1] if out.dim() == 3 else out


class TextMatching(nn.Module):
    """ID-agnostic: ``z_i = g_t(text_i)``, ``s_u = g_t(rationale_u)``, score = scale * cos(s_u, z_i)."""

    per_position = False

    def __init__(self, text: torch.Tensor, out_dim: int | None = None):
        super().__init__()
        D = text.shape[1]
        out_dim = out_dim or D
        self.register_buffer("text", text.float(), persistent=False)
        self.g_t = nn.Linear(D, out_dim)
        with torch.no_grad():
            if out_dim == D:
                self.g_t.weight.copy_(torch.eye(D))
            self.g_t.bias.zero_()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def item_vectors(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        t = self.text if ids is None else self.text[ids]
        return F.normalize(self.g_t(t), dim=-1) * self.logit_scale.exp()

    def user_vectors(self, r: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.g_t(r), dim=-1)
