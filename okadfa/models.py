"""The OKADFA language model (DESIGN.md §4–5): KOA blocks trained by DFA or backprop.

    cfg = OKADFAConfig.preset("tiny", training="dfa")
    model = OKADFAModel(cfg)
    out = model(input_ids, targets)      # out.loss, out.logits (None while DFA-training)
    out.loss.backward(); opt.step()

The same code trains with `training="bp"` (plain backprop) or "dfa", and with
`attention="favor"` or "softmax", so the four combinations compare like for like.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dfa import DFA
from .nn import KOABlock
from .ops.dfa_head import checked_targets
from .ortho import OrthoSchedule, model_orthogonality_loss

__all__ = ["OKADFAConfig", "OKADFAModel", "ModelOutput"]

_PRESETS = {
    "tiny": dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=256, nb_features=64),
    "gpt2-small": dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024, nb_features=256),
    "gpt2-medium": dict(vocab_size=50257, d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024,
                        nb_features=256),
}

_CHOICES = dict(attention=("favor", "softmax"), training=("dfa", "bp"), error=("hidden", "logits"),
                points=("block", "sublayer"), feedback_dist=("normal", "uniform"),
                feedback_storage=("seeded", "stored"))


@dataclass
class OKADFAConfig:
    """Model and training-rule settings. `OKADFAConfig.preset(name, **overrides)`
    gives "tiny" (byte-level CPU demo), "gpt2-small" (124M) or "gpt2-medium" (350M)."""
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int | None = None                 # default 4·d_model
    max_seq_len: int = 256
    attention: str = "favor"                # "favor" | "softmax"
    nb_features: int = 64                   # FAVOR+ random features per head
    redraw_interval: int | None = None      # redraw FAVOR+ features every N training steps
    training: str = "dfa"                   # "dfa" | "bp"
    error: str = "hidden"                   # DFA error: "hidden" (before unembedding) | "logits"
    points: str = "block"                   # DFA feedback points: "block" | "sublayer"
    dfa_embed: bool = False                 # embedding from its own feedback point (else backprop via block 1)
    feedback_dist: str = "normal"
    feedback_shared: bool = False
    feedback_storage: str = "seeded"        # "seeded" | "stored"
    feedback_seed: int = 0
    feature_seed: int = 0
    ortho_lambda: float = 0.0
    ortho_warmup: int = 0
    ortho_per_head: bool = False
    tie_weights: bool = True
    backend: str = "auto"

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"OKADFAConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "nb_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"OKADFAConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.ortho_lambda < 0 or self.ortho_warmup < 0:
            raise ValueError("ortho_lambda and ortho_warmup must be >= 0")

    @classmethod
    def preset(cls, name: str, **overrides) -> "OKADFAConfig":
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ModelOutput:
    loss: Tensor | None = None              # total loss (cross-entropy + orthogonality term)
    logits: Tensor | None = None            # (B, T, V); None while DFA-training (never formed whole)
    ce_loss: Tensor | None = None
    ortho_loss: Tensor | None = None
    extras: dict = field(default_factory=dict)


class OKADFAModel(nn.Module):
    """Token + position embeddings, `n_layers` KOA blocks, final LayerNorm, unembedding.

    forward(input_ids (B, T), targets (B, T) or None) -> ModelOutput. In training
    mode with training="dfa" and targets, the loss's backward routes DFA signals
    (see okadfa.dfa); in eval mode, or with training="bp", it is plain backprop.
    """

    def __init__(self, config: OKADFAConfig):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.max_seq_len, c.d_model)
        self.blocks = nn.ModuleList(
            KOABlock(c.d_model, c.n_heads, c.d_ff, attention=c.attention, nb_features=c.nb_features,
                     redraw_interval=c.redraw_interval, feature_seed=c.feature_seed * 1009 + i, backend=c.backend)
            for i in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        if c.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        names = (["embed"] if c.dfa_embed else []) + [
            f"block{i}" + (f".{part}" if c.points == "sublayer" else "")
            for i in range(c.n_layers) for part in (("attn", "mlp") if c.points == "sublayer" else ("",))]
        self.dfa = DFA(names, c.d_model, c.d_model if c.error == "hidden" else c.vocab_size, error=c.error,
                       seed=c.feedback_seed, dist=c.feedback_dist, shared=c.feedback_shared,
                       storage=c.feedback_storage) if c.training == "dfa" else None
        self.ortho_schedule = OrthoSchedule(c.ortho_lambda, c.ortho_warmup)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _segments(self):
        """The trunk as a list of (point name, function) between feedback points."""
        segs = []
        for i, block in enumerate(self.blocks):
            if self.config.points == "sublayer":
                segs += [(f"block{i}.attn", block.attention_step), (f"block{i}.mlp", block.mlp_step)]
            else:
                segs.append((f"block{i}", block))
        return segs

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, *, ignore_index: int = -100) -> ModelOutput:
        dfa = self.dfa is not None and self.training and targets is not None
        x = self.embed(input_ids)
        points = []
        if dfa and self.config.dfa_embed:
            points.append(x)
        for i, (_, seg) in enumerate(self._segments()):
            # DFA: no gradient crosses between segments (block 1 may still backprop into the embedding).
            if dfa and (i > 0 or self.config.dfa_embed):
                x = x.detach()
            x = seg(x)
            if dfa:
                points.append(x)
        out = ModelOutput()
        if dfa:
            h = self.ln_f(x.detach())
            out.ce_loss = self.dfa.loss(h, self.lm_head.weight, targets, points, ignore_index=ignore_index)
        else:
            out.logits = self.lm_head(self.ln_f(x))
            if targets is not None:
                if torch.compiler.is_compiling():    # an out-of-range target would abort the compiled kernel
                    targets = checked_targets(targets, self.config.vocab_size, ignore_index)
                out.ce_loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
        if out.ce_loss is not None:
            out.loss = out.ce_loss
            if self.config.ortho_lambda > 0:
                out.ortho_loss = model_orthogonality_loss(self, per_head=self.config.ortho_per_head)
                out.loss = out.loss + self.ortho_schedule(self.step).to(out.ortho_loss.dtype) * out.ortho_loss
            if self.training:
                if torch.compiler.is_compiling():    # out of place: the compiled backward reads the old value
                    self.step = self.step + 1
                else:
                    self.step += 1
        return out

    def embed(self, input_ids: Tensor, start: int = 0) -> Tensor:
        """Token + position embeddings of input_ids (B, T) at positions start … start+T−1."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        end = start + input_ids.shape[1]
        if end > self.config.max_seq_len:
            raise ValueError(f"sequence length {end} exceeds max_seq_len {self.config.max_seq_len}")
        return self.tok_emb(input_ids) + self.pos_emb(torch.arange(start, end, device=input_ids.device))

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> Tensor:
        """Sample max_new_tokens tokens after input_ids (B, T0); returns (B, T0 + max_new_tokens).

        temperature=0 is greedy. With use_cache (default) the prompt is encoded once and
        each new token costs one position per block: O(1) with FAVOR+ (`FavorState`),
        O(t) with softmax (`KVCache`). use_cache=False re-encodes the window for every
        token (the same tokens, to rounding). The window holds at most max_seq_len
        positions: when it is full it restarts from the last ¾·max_seq_len tokens
        (re-encoded at once), so the cached cost stays O(1) per token on average.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        was_training = self.training
        self.eval()
        limit = self.config.max_seq_len
        keep = max(1, limit - limit // 4)             # tokens kept when the window restarts
        try:
            ids, start, caches = input_ids, max(0, input_ids.shape[1] - limit), None
            for _ in range(max_new_tokens):
                if ids.shape[1] - start > limit:
                    start, caches = ids.shape[1] - keep, None
                if not use_cache:
                    h = self._trunk(self.embed(ids[:, start:]))
                elif caches is None:
                    caches = [block.attn.new_cache() for block in self.blocks]
                    h = self._trunk(self.embed(ids[:, start:]), caches)
                else:
                    h = self._trunk(self.embed(ids[:, -1:], ids.shape[1] - 1 - start), caches)
                logits = self.lm_head(self.ln_f(h[:, -1])).float()
                if temperature == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
                ids = torch.cat([ids, nxt], dim=1)
            return ids
        finally:
            self.train(was_training)

    def _trunk(self, x: Tensor, caches: list | None = None) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return x

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
