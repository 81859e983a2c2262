"""The OKADFA language model (docs/design.md §4–5): KOA blocks trained by DFA or backprop.

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

from .decoding import FavorState
from .dfa import DFA
from .nn import KOABlock
from .ops.dfa_head import checked_targets
from .ortho import OrthoSchedule, model_orthogonality_loss

__all__ = ["OKADFACache", "OKADFAConfig", "OKADFAModel", "ModelOutput", "feedback_points", "RULE_DEFAULTS"]

_PRESETS = {
    "tiny": dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=256, nb_features=64),
    "gpt2-small": dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024, nb_features=256),
    "gpt2-medium": dict(vocab_size=50257, d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024,
                        nb_features=256),
}

# Feedback point kinds per `points` setting: "attn" after the attention sub-layer, "hidden" the
# MLP's hidden activation, "mlp" the block output (after the MLP sub-layer).
_POINT_KINDS = {"block": ("mlp",), "sublayer": ("attn", "mlp"), "micro": ("attn", "hidden", "mlp")}

# Architecture defaults that depend on the training rule (fields left None), measured:
# bench/results/dfa_sweep_one.md. `okadfa compare` gives every variant the "dfa" ones.
RULE_DEFAULTS = {"dfa": dict(norm="post", tie_weights=False), "bp": dict(norm="pre", tie_weights=True)}

_CHOICES = dict(attention=("favor", "softmax"), training=("dfa", "bp"), error=("hidden", "logits", "stream"),
                points=("block", "sublayer", "micro"), norm=("pre", "post"), feedback_dist=("normal", "uniform", "spd"),
                feedback_storage=("seeded", "stored"))


@dataclass
class OKADFAConfig:
    """Model and training-rule settings. `OKADFAConfig.preset(name, **overrides)`
    gives "tiny" (byte-level CPU demo), "gpt2-small" (124M) or "gpt2-medium" (350M).

    DFA defaults, chosen by measurement (tiny preset, stdlib bytes, 400 steps of 16×128,
    3 seeds; bench/results/dfa_sweep_one.md and dfa_sweep_combine.md, `python -m
    okadfa.bench.dfa_sweep`):
    - norm: "post" when training="dfa" (val loss 2.646 against 3.308 pre-LN, worse than
      a unigram model, and 2.687 pre-LN with point_norm). A feedback point must be a
      normalised activation: on the raw pre-LN residual stream, which only LayerNorms
      read, the blocks follow the signal without limit (norms ~10⁴) and learn nothing.
      "pre" when training="bp" (GPT-2's placement).
    - feedback_shared=True (2.540 against 2.646) and tie_weights=False when training="dfa"
      (2.595); together 2.497.
    - feedback_dist="spd" (okadfa's own variant, B = G Gᵀ, see okadfa.dfa.DFA: 2.496 alone,
      2.455 ± 0.006 with the two above) where it applies; "normal" for error="logits" or
      points="micro". feedback_storage follows: "stored" for spd, else "seeded".
    - points="block" (sublayer 2.808, micro 2.959), dfa_embed=False (2.742),
      error="hidden".
    Left None, norm / tie_weights (RULE_DEFAULTS), feedback_dist and feedback_storage
    are resolved at construction; `to_dict()` holds the resolved values.
    """
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
    norm: str | None = None                 # "pre" | "post" LayerNorm placement; None: by training (below)
    point_norm: bool = False                # pre-LN DFA: feedback at a parameter-free LayerNorm of each point
    error: str = "hidden"                   # DFA error: "hidden" (before unembedding) | "logits" | "stream"
    points: str = "block"                   # DFA feedback points: "block" | "sublayer" | "micro"
    dfa_embed: bool = False                 # embedding from its own feedback point (else backprop via block 1)
    feedback_dist: str | None = None        # "normal" | "uniform" | "spd" (B = G Gᵀ, stored); None: see below
    feedback_shared: bool = True            # one feedback matrix for every point
    feedback_storage: str | None = None     # "seeded" | "stored"; None: "stored" for spd, else "seeded"
    feedback_seed: int = 0
    feature_seed: int = 0
    ortho_lambda: float = 0.0
    ortho_warmup: int = 0
    ortho_per_head: bool = False
    tie_weights: bool | None = None         # unembedding = token embedding; None: by training (below)
    backend: str = "auto"

    def __post_init__(self):
        for name, value in RULE_DEFAULTS.get(self.training, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.feedback_dist is None:          # spd needs every point d wide and a d-wide error
            self.feedback_dist = "normal" if self.error == "logits" or self.points == "micro" else "spd"
        if self.feedback_storage is None:
            self.feedback_storage = "stored" if self.feedback_dist == "spd" else "seeded"
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"OKADFAConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "nb_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"OKADFAConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("d_ff", "redraw_interval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"OKADFAConfig.{name} must be positive or None, got {value}")
        # feedback_seed: a FeedbackSpec seed (FeedbackSpec checks [0, 2**64)) kept to an int64;
        # feature_seed: each layer draws from feature_seed·1009 + i, which torch's generator takes.
        for name, bound in (("feedback_seed", 2 ** 63), ("feature_seed", 2 ** 32)):
            value = getattr(self, name)
            if not 0 <= value < bound:
                raise ValueError(f"OKADFAConfig.{name} must be in [0, {bound}), got {value}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.point_norm and self.norm != "pre":
            raise ValueError("OKADFAConfig.point_norm applies to norm='pre' (post-LN points are normalised already)")
        if self.points == "micro" and self.error == "logits":
            raise ValueError("OKADFAConfig.points='micro' needs error='hidden' or 'stream' (its MLP hidden points "
                             "are d_ff wide)")
        if self.feedback_dist == "spd" and (self.feedback_storage != "stored" or self.error == "logits"
                                            or self.points == "micro"):
            raise ValueError("OKADFAConfig.feedback_dist='spd' needs feedback_storage='stored', error='hidden' or "
                             "'stream', and points of width d_model (not 'micro')")
        if self.ortho_lambda < 0 or self.ortho_warmup < 0:
            raise ValueError("ortho_lambda and ortho_warmup must be >= 0")

    @classmethod
    def preset(cls, name: str, **overrides) -> "OKADFAConfig":
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def feedback_points(c: OKADFAConfig) -> tuple[list[str], list[int]]:
    """(names, widths) of the DFA feedback points of config c, in the order the trunk meets them:
    "embed" (dfa_embed), then per block i "block<i>" (points="block") or "block<i>.attn",
    ("block<i>.hidden", d_ff wide, for "micro"), "block<i>.mlp"."""
    names, widths = (["embed"], [c.d_model]) if c.dfa_embed else ([], [])
    for i in range(c.n_layers):
        for kind in _POINT_KINDS[c.points]:
            names.append(f"block{i}" if c.points == "block" else f"block{i}.{kind}")
            widths.append((c.d_ff or 4 * c.d_model) if kind == "hidden" else c.d_model)
    return names, widths


@dataclass
class ModelOutput:
    loss: Tensor | None = None              # total loss (cross-entropy + orthogonality term)
    logits: Tensor | None = None            # (B, T, V); None while DFA-training (never formed whole)
    ce_loss: Tensor | None = None
    ortho_loss: Tensor | None = None
    extras: dict = field(default_factory=dict)


class OKADFAModel(nn.Module):
    """Token + position embeddings, `n_layers` KOA blocks, final LayerNorm, unembedding.

    forward(input_ids (B, T), targets (B, T) or None, *, key_mask=None, cache=None) ->
    ModelOutput. In training mode with training="dfa" and targets, the loss's backward
    routes DFA signals (see okadfa.dfa); in eval mode, or with training="bp", it is plain
    backprop. key_mask: padding (True = a real token); cache: an OKADFACache for decoding.
    The Hugging Face wrapper is okadfa.integrations.transformers_model.OKADFAForCausalLM.
    """

    def __init__(self, config: OKADFAConfig):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.max_seq_len, c.d_model)
        self.blocks = nn.ModuleList(
            KOABlock(c.d_model, c.n_heads, c.d_ff, attention=c.attention, nb_features=c.nb_features,
                     redraw_interval=c.redraw_interval, feature_seed=c.feature_seed * 1009 + i, backend=c.backend,
                     norm=c.norm)
            for i in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model) if c.norm == "pre" else nn.Identity()   # post-LN ends normalised
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        if c.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        names, widths = feedback_points(c)
        self.dfa = DFA(names, widths, c.vocab_size if c.error == "logits" else c.d_model, error=c.error,
                       seed=c.feedback_seed, dist=c.feedback_dist, shared=c.feedback_shared,
                       storage=c.feedback_storage) if c.training == "dfa" else None
        self.ortho_schedule = OrthoSchedule(c.ortho_lambda, c.ortho_warmup)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, *, ignore_index: int = -100,
                key_mask: Tensor | None = None, cache: "OKADFACache | None" = None) -> ModelOutput:
        """input_ids (B, T); targets (B, T), the next token of each position (ignore_index: no
        loss there), or None.

        key_mask: None or bool (B, T), True = a real token. Padded tokens are attended by no
        position, take no position (each sequence's real tokens are numbered 0, 1, … whatever
        padding precedes them, so left and right padding give each sequence the outputs it
        gets alone) and get no loss (their targets count as ignore_index; a real position
        whose next token is padding needs ignore_index in targets, as HF's collators set).
        cache: an `OKADFACache` for incremental decoding (eval or backprop only): the T tokens
        are appended to it, key_mask covering just them."""
        dfa = self.dfa is not None and self.training and targets is not None
        if dfa and cache is not None:
            raise ValueError("a cache is for decoding: DFA training (train mode with targets) takes none")
        key_mask = self._check_key_mask(key_mask, input_ids)
        if targets is not None and key_mask is not None:
            targets = targets.masked_fill(~key_mask, ignore_index)
        positions, counts = self._positions(input_ids, key_mask, cache)
        x = self.embed(input_ids, positions)
        if cache is not None:                        # the tokens fit: the cache takes them
            cache.length, cache.real = counts
        if dfa:
            x, points = self.trunk_points(x, key_mask)
        else:
            x = self._trunk(x, cache, key_mask)
        out = ModelOutput()
        if dfa:
            h = self.ln_f(x.detach())
            out.ce_loss = self.dfa.loss(h, self.lm_head.weight, targets, points, ignore_index=ignore_index,
                                        stream=(x.detach(), self.ln_f))
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

    @staticmethod
    def _check_key_mask(key_mask, input_ids: Tensor) -> Tensor | None:
        """key_mask checked, or None when it has no padding (the unpadded path)."""
        if key_mask is None:
            return None
        if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
            raise TypeError("key_mask must be a bool tensor (B, T), True = a real token, got "
                            + (str(key_mask.dtype) if isinstance(key_mask, Tensor) else type(key_mask).__name__))
        if key_mask.shape != input_ids.shape or key_mask.device != input_ids.device:
            raise ValueError(f"key_mask must have the shape and device of input_ids {tuple(input_ids.shape)} on "
                             f"{input_ids.device}, got {tuple(key_mask.shape)} on {key_mask.device}")
        return None if bool(key_mask.all()) else key_mask

    def _positions(self, input_ids: Tensor, key_mask: Tensor | None, cache) -> tuple[int | Tensor, tuple]:
        """The position of each token, its sequence's count of real tokens before it (an int
        offset while no sequence has padding), and the cache's counts once it holds these tokens
        ((length, real), None without a cache); the cache itself is not changed here."""
        if cache is None and key_mask is None:
            return 0, None
        if cache is not None:
            cache.check_batch(input_ids.shape[0])
        if cache is not None and cache.real is None and key_mask is None:
            return cache.length, (cache.length + input_ids.shape[1], None)
        real = key_mask if key_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        before = torch.cumsum(real, 1) - real.long()
        if cache is None:
            return before, None
        # no padding so far: every cached token is real
        seen = cache.real if cache.real is not None else torch.full(
            (input_ids.shape[0],), cache.length, dtype=torch.long, device=real.device)
        return before + seen[:, None], (cache.length + input_ids.shape[1], seen + real.sum(1))

    def embed(self, input_ids: Tensor, start: int | Tensor = 0) -> Tensor:
        """Token + position embeddings of input_ids (B, T): at positions start … start+T−1 for
        an int start, or at the given (B, T) positions."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        if isinstance(start, Tensor):
            positions, last = start, int(start.max()) + 1 if start.numel() else 0
        else:
            last = start + input_ids.shape[1]
            positions = torch.arange(start, last, device=input_ids.device)
        if last > self.config.max_seq_len:
            raise ValueError(f"sequence length {last} exceeds max_seq_len {self.config.max_seq_len}")
        return self.tok_emb(input_ids) + self.pos_emb(positions)

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
        def whole(value):                             # an int (or numpy/torch integer), not a bool
            return not isinstance(value, bool) and hasattr(value, "__index__") and not isinstance(value, Tensor)
        if not whole(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        try:
            temp = None if isinstance(temperature, (bool, str)) else float(temperature)
        except (TypeError, ValueError):
            temp = None
        if temp is None or not 0 <= temp < float("inf"):   # NaN fails both comparisons
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
        if top_k is not None and (not whole(top_k) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1 or (
                input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool):
            raise ValueError("input_ids must be an integer tensor of shape (B, T) with T >= 1, got "
                             + (f"{input_ids.dtype} of shape {tuple(input_ids.shape)}"
                                if isinstance(input_ids, Tensor) else type(input_ids).__name__))
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        was_training = self.training
        self.eval()
        limit = self.config.max_seq_len
        keep = max(1, limit - limit // 4)             # tokens kept when the window restarts
        try:
            ids, start, cache = input_ids, max(0, input_ids.shape[1] - limit), None
            for _ in range(max_new_tokens):
                if ids.shape[1] - start > limit:
                    start, cache = ids.shape[1] - keep, None
                if not use_cache:
                    h = self._trunk(self.embed(ids[:, start:]))
                elif cache is None:
                    cache = OKADFACache(self)
                    h = self._trunk(self.embed(ids[:, start:]), cache)
                    cache.length = ids.shape[1] - start
                else:
                    h = self._trunk(self.embed(ids[:, -1:], ids.shape[1] - 1 - start), cache)
                    cache.length += 1
                logits = self.lm_head(self.ln_f(h[:, -1])).float()
                if temp == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temp
                    if top_k is not None:
                        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
                ids = torch.cat([ids, nxt], dim=1)
            return ids
        finally:
            self.train(was_training)

    def trunk_points(self, x: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """The trunk on embeddings x (B, T, d) (key_mask as in `forward`) with DFA's feedback points: returns (output,
        the activation at each point of `self.dfa.points`, in order). At every point the
        stream is detached, so no gradient crosses it; with point_norm a residual-stream
        point is the parameter-free LayerNorm of the activation (the signal enters there)."""
        kinds = _POINT_KINDS[self.config.points]
        points = []

        def tap(kind, t):
            if kind not in kinds:
                return t
            points.append(F.layer_norm(t, t.shape[-1:]) if self.config.point_norm and kind != "hidden" else t)
            return t.detach()

        if self.config.dfa_embed:
            x = tap("mlp", x)                 # else block 1 backpropagates into the embedding
        for block in self.blocks:
            x = tap("mlp", block(x, tap=tap, key_mask=key_mask))
        return x, points

    def _trunk(self, x: Tensor, cache: "OKADFACache | None" = None, key_mask: Tensor | None = None) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i], key_mask=key_mask)
        return x

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class OKADFACache:
    """The decoding state of an `OKADFAModel`, for `forward(..., cache=)`: each block's attention
    cache (`FavorState`, whose size and cost per token do not grow with the context, or
    `KVCache` for softmax attention) and how many tokens each sequence holds.

        cache = OKADFACache(model)
        logits = model(prompt, cache=cache).logits            # the prompt, once
        logits = model(next_ids, cache=cache).logits          # (B, 1): one position per block
    """

    def __init__(self, model: OKADFAModel):
        self.layers = [block.attn.new_cache() for block in model.blocks]
        self.length = 0                       # tokens appended, padding included
        self.real: Tensor | None = None       # (B,) real tokens per sequence, once any was padding
        self.batch: int | None = None         # B, fixed by the first tokens

    # read by transformers' generate(): no static-cache compilation, no rolling back (assisted decoding)
    is_compileable = False
    is_croppable = False

    @property
    def is_linear(self) -> list[bool]:
        """Per block: whether its state has a fixed size (FavorState), as transformers asks."""
        return [isinstance(layer, FavorState) for layer in self.layers]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def check_batch(self, batch: int) -> None:
        """Fix the batch size at the first tokens; refuse another one later."""
        if self.batch is None:
            self.batch = batch
        elif batch != self.batch:
            raise ValueError(f"this OKADFACache holds {self.batch} sequences, got input_ids for {batch}")

    def reorder_cache(self, index: Tensor) -> None:
        """Keep the sequences `index` (B',) picks, in that order (beam search)."""
        if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
            raise ValueError("reorder_cache takes a 1-d integer tensor of sequence indices")
        if self.batch is not None and index.numel() and not 0 <= int(index.min()) <= int(index.max()) < self.batch:
            raise ValueError(f"reorder_cache: indices must lie in [0, {self.batch})")
        if self.batch is not None:
            self.batch = index.numel()
        for layer in self.layers:
            if isinstance(layer, FavorState):
                if layer.carried is not None:
                    layer.carried = tuple(x.index_select(0, index.to(x.device)) for x in layer.carried)
                    layer._batch = torch.Size((len(index), *layer._batch[1:]))
            else:
                for name in ("keys", "values", "key_mask"):
                    x = getattr(layer, name)
                    if x is not None:
                        setattr(layer, name, x.index_select(0, index.to(x.device)))
        if self.real is not None:
            self.real = self.real.index_select(0, index.to(self.real.device))
