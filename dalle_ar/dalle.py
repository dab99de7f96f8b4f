"""The prior: a decoder-only transformer over [text tokens ; image tokens] (DALL-E, section 2.2).

    text [B, text_len] ──pads -> per-position pad tokens──▶ text emb + text pos ─┐
    codes [B, h, w] ──raster──▶ image emb + row emb + column emb (all but the last)┴▶ Transformer
        ├─ text head  on text positions 0..T-2  -> next text token (pads included), weight 1/8
        └─ image head on positions T-1..       -> image codes 0..N-1,               weight 7/8

The last text position predicts the first image code, so text positions only ever predict
text and image positions only image codes. A pad at text position i is the learned token
`text_vocab_size + i` (the paper's per-position padding tokens, instead of masking). Caption
dropout (`null_prob`) replaces a training caption by all pads: the null caption, which is also
the unconditional branch of classifier-free guidance at sampling time.

`generate` prefills the text (and any primed image rows) in one pass into a preallocated KV
cache, then decodes one image token per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import io
from .checks import check_tokens
from .transformer import ATTN_TYPES, Transformer


@dataclass
class DALLEConfig:
    # 0 = not set yet: the dalle trainer fills vocabularies and grid from the tokenizer and dVAE.
    text_vocab_size: int = 0
    text_len: int = 32
    image_vocab_size: int = 0
    image_grid: int = 0             # h = w of the dVAE code grid
    dim: int = 256
    depth: int = 4
    heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.0
    attn_types: tuple = ("full",)   # cycled over layers; paper: row, column, row, row, ... and conv last
    conv_kernel: int = 11           # odd; paper 11 on 32 x 32, use ~5 on 8 x 8
    loss_text_weight: float = 1 / 8  # the image loss weighs 1 - this
    null_prob: float = 0.1          # caption dropout rate (trains the unconditional branch for guidance)
    pad_id: int = 0                 # the tokenizer's pad id
    tie_heads: bool = False         # output heads share the token embedding matrices
    guidance_scale: float = 1.0     # recommended classifier-free guidance for generation (CLI default)
    temperature: float = 1.0        # recommended sampling temperature (pipeline and CLI default)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (called when a model is built)."""
        def integer(name, low):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"DALLEConfig.{name} must be an int >= {low}, got {v!r}")

        for name, low in (("text_vocab_size", 1), ("text_len", 1), ("image_vocab_size", 2),
                          ("image_grid", 1), ("dim", 1), ("depth", 1), ("heads", 1), ("ff_mult", 1),
                          ("conv_kernel", 1), ("pad_id", 0)):
            integer(name, low)
        if self.dim % self.heads:
            raise ValueError(f"DALLEConfig.dim={self.dim} is not a multiple of heads={self.heads}")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"DALLEConfig.conv_kernel must be odd, got {self.conv_kernel}")
        if self.pad_id >= self.text_vocab_size:
            raise ValueError(f"DALLEConfig.pad_id={self.pad_id} >= text_vocab_size={self.text_vocab_size}")
        types = self.attn_types
        if isinstance(types, str) or not isinstance(types, (tuple, list)) or not types \
                or any(t not in ATTN_TYPES for t in types):
            raise ValueError(f"DALLEConfig.attn_types must be a non-empty tuple of {ATTN_TYPES}, got {types!r}")
        for name, low, high in (("dropout", 0.0, 0.999), ("loss_text_weight", 0.0, 1.0), ("null_prob", 0.0, 1.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not low <= v <= high:
                raise ValueError(f"DALLEConfig.{name} must be in [{low}, {high}], got {v!r}")
        check_guidance(self.guidance_scale, "DALLEConfig.guidance_scale")
        check_temperature(self.temperature, "DALLEConfig.temperature")


def check_temperature(v, name="temperature") -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


def check_guidance(v, name="guidance_scale") -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (1 = no guidance, 0 = unconditional), got {v!r}")


def sample_logits(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Draw one token per row of logits [B, V] by inverse CDF from uniforms u [B] in [0, 1).

    Uniforms drawn up front (not torch.multinomial) make sample b's draws independent of the
    batch size. Filtered tokens have probability exactly 0 and are never drawn.
    """
    logits = logits.float() if temperature == 1 else logits.float() / temperature
    vocab = logits.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # Drop a token once the more likely ones already reach top_p (the top one always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1).clamp_(max=vocab - 1)
    # Rounding can land u * total on the very end of the cdf: fall back to the likeliest token.
    bad = probs.gather(-1, idx[:, None]).squeeze(-1) == 0
    return torch.where(bad, probs.argmax(-1), idx)


def _token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits [B, V])[b, tokens[b]] -> [B]."""
    return logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


class DALLE(nn.Module):
    def __init__(self, config: DALLEConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        self.num_image_tokens = c.image_grid ** 2
        self.text_emb = nn.Embedding(c.text_vocab_size + c.text_len, c.dim)  # + one pad token per position
        self.text_pos = nn.Embedding(c.text_len, c.dim)
        self.image_emb = nn.Embedding(c.image_vocab_size, c.dim)
        self.image_row = nn.Embedding(c.image_grid, c.dim)
        self.image_col = nn.Embedding(c.image_grid, c.dim)
        self.drop = nn.Dropout(c.dropout)
        self.transformer = Transformer(c.dim, c.depth, c.heads, text_len=c.text_len, grid=c.image_grid,
                                       attn_types=tuple(c.attn_types), conv_kernel=c.conv_kernel,
                                       ff_mult=c.ff_mult, dropout=c.dropout)
        # Tied heads reuse the embedding matrices in F.linear (no shared tensors in the state dict,
        # which safetensors refuses).
        self.text_head = None if c.tie_heads else nn.Linear(c.dim, c.text_vocab_size + c.text_len, bias=False)
        self.image_head = None if c.tie_heads else nn.Linear(c.dim, c.image_vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections, scaled as in GPT-2
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.depth))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # ---- pieces ------------------------------------------------------------------------------

    def _text_logits(self, h):
        return F.linear(h, self.text_emb.weight) if self.text_head is None else self.text_head(h)

    def _image_logits(self, h):
        return F.linear(h, self.image_emb.weight) if self.image_head is None else self.image_head(h)

    def text_ids(self, text: torch.Tensor) -> torch.Tensor:
        """Replace each pad at position i by the learned pad token text_vocab_size + i."""
        c = self.config
        positions = torch.arange(c.text_len, device=text.device)
        return torch.where(text == c.pad_id, c.text_vocab_size + positions, text)

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.text_emb(self.text_ids(text)) + self.text_pos.weight

    def embed_image(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """codes [B, n] at raster indices start .. start + n - 1 -> [B, n, dim]."""
        idx = torch.arange(start, start + codes.shape[1], device=codes.device)
        g = self.config.image_grid
        return self.image_emb(codes) + self.image_row(idx // g) + self.image_col(idx % g)

    def drop_captions(self, text: torch.Tensor):
        """Caption dropout: each caption becomes the null caption (all pads) with prob null_prob.

        -> (text, dropped BoolTensor[B]). Draws from the global RNG (seeded by the trainer).
        """
        dropped = torch.rand(text.shape[0], device=text.device) < self.config.null_prob
        return text.masked_fill(dropped[:, None], self.config.pad_id), dropped

    def check_text(self, text) -> torch.Tensor:
        return check_tokens("text", text, (None, self.config.text_len), self.config.text_vocab_size)

    def check_codes(self, codes, batch: Optional[int] = None) -> torch.Tensor:
        g = self.config.image_grid
        return check_tokens("codes", codes, (batch, g, g), self.config.image_vocab_size)

    # ---- training ----------------------------------------------------------------------------

    def logits(self, text: torch.Tensor, codes: torch.Tensor):
        """Teacher-forced pass -> (text logits [B, T-1, Vt+T] for text tokens 1..T-1,
        image logits [B, N, Vi] for image codes 0..N-1). No caption dropout here."""
        T = self.config.text_len
        flat = codes.flatten(1)
        x = torch.cat([self.embed_text(text), self.embed_image(flat[:, :-1])], dim=1)
        h = self.transformer(self.drop(x))
        return self._text_logits(h[:, :T - 1]), self._image_logits(h[:, T - 1:])

    def forward(self, text: torch.Tensor, codes: torch.Tensor):
        """text Long[B, T], codes Long[B, h, w] -> (loss, {"loss_text", "loss_image"}).

        Each cross-entropy is normalised by its token count; captions dropped to the null caption
        are left out of the text loss (there is no text to model there).
        """
        c = self.config
        text = self.check_text(text)
        codes = self.check_codes(codes, text.shape[0])
        keep = torch.ones(text.shape[0], dtype=torch.bool, device=text.device)
        if self.training and c.null_prob > 0:
            text, dropped = self.drop_captions(text)
            keep = ~dropped
        text_logits, image_logits = self.logits(text, codes)
        loss_image = F.cross_entropy(image_logits.flatten(0, 1), codes.flatten())
        if c.text_len > 1:
            targets = self.text_ids(text)[:, 1:]
            ce = F.cross_entropy(text_logits.flatten(0, 1), targets.flatten(), reduction="none")
            ce = ce.view_as(targets) * keep[:, None]
            loss_text = ce.sum() / (keep.sum() * targets.shape[1]).clamp(min=1)
        else:
            loss_text = loss_image.new_zeros(())
        loss = c.loss_text_weight * loss_text + (1 - c.loss_text_weight) * loss_image
        return loss, {"loss_text": loss_text.detach(), "loss_image": loss_image.detach()}

    # ---- cached decoding ---------------------------------------------------------------------

    def new_cache(self, static: Optional[bool] = None):
        """An empty KV cache (see `transformer.KVCache`; static: every step attends over all slots)."""
        return self.transformer.new_cache(static)

    def prefill(self, text: torch.Tensor, cache, prime: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Write text [B, T] (+ primed codes [B, n0]) into an empty cache in one pass.

        -> image logits [B, Vi] for image code n0 (code 0 without a prime).
        """
        x = self.embed_text(text)
        if prime is not None and prime.shape[1]:
            x = torch.cat([x, self.embed_image(prime)], dim=1)
        return self._image_logits(self.transformer(x, cache, start=0)[:, -1])

    def step(self, codes: torch.Tensor, index: int, cache) -> torch.Tensor:
        """Feed image code `index` (codes [B]) -> image logits [B, Vi] for code index + 1. Inference only."""
        g = self.config.image_grid
        x = self.image_emb(codes) + self.image_row.weight[index // g] + self.image_col.weight[index % g]
        return self._image_logits(self.transformer.step(x, cache, self.config.text_len + index))

    @torch.no_grad()
    def generate(self, text: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, guidance_scale: float = 1.0,
                 generator: Optional[torch.Generator] = None, prime: Optional[torch.Tensor] = None,
                 null_text: Optional[torch.Tensor] = None,
                 callback: Optional[Callable[[int, torch.Tensor], None]] = None,
                 noise: Optional[torch.Tensor] = None, return_log_probs: bool = False):
        """Sample image codes for text Long[B, T] -> Long[B, h, w].

        temperature > 0 divides the logits; top_k keeps the k likeliest codes, top_p the smallest
        set reaching probability top_p (applied after top_k). guidance_scale s != 1 runs the
        conditional and the unconditional (null caption) branch as one batch of 2B and samples
        from uncond + s * (cond - uncond). `generator` (on any device) makes draws reproducible:
        sample b gets the same draws whatever the batch size. `prime` Long[B, r, w] (0 <= r < h)
        fixes the first r rows; they are returned unchanged. `null_text` Long[B, T] replaces the null
        caption in the unconditional branch of guidance (a negative prompt). `callback(i, codes)`
        runs after image code i is drawn, codes Long[B, N] filled up to i (progress bars, timing).
        `noise` float [B, h*w - r] in [0, 1): the uniforms to sample with instead of drawing them from
        `generator` (row b of a batch gets the same codes as alone with row b of noise, e.g. rows of
        differently seeded prompts).
        `return_log_probs`: also return float [B, 2], the log-likelihood of each sample's sampled codes
        (primed rows excluded) under the model's own distribution (temperature 1, no truncation) given
        its caption, and given the null caption (`null_text`): column 0 - column 1 is the caption's
        pointwise mutual information with the image, a reranking score. Under guidance both branches
        run anyway; without it column 1 is NaN (`log_likelihood` computes it in one pass).
        """
        c = self.config
        text = self.check_text(text)
        B, g, N = text.shape[0], c.image_grid, self.num_image_tokens
        check_temperature(temperature)
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool)
                                  or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
        check_guidance(guidance_scale)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")
        n0 = 0
        if prime is not None:
            if isinstance(prime, torch.Tensor) and prime.dim() == 3 and prime.shape[1] >= g:
                raise ValueError(f"prime has {prime.shape[1]} rows; at most {g - 1} of {g} can be primed")
            prime = check_tokens("prime", prime, (B, None, g), c.image_vocab_size).flatten(1)
            n0 = prime.shape[1]
        if null_text is not None:
            null_text = check_tokens("null_text", null_text, (B, c.text_len), c.text_vocab_size)
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable, got {type(callback).__name__}")

        device = self.text_emb.weight.device
        text = text.to(device)
        prime = prime.to(device) if prime is not None else None
        guided = guidance_scale != 1
        if guided:  # one batch: [conditional ; unconditional (null caption)]
            null = torch.full_like(text, c.pad_id) if null_text is None else null_text.to(device)
            text = torch.cat([text, null])
            prime = prime.repeat(2, 1) if prime is not None else None
        # All uniforms up front, [B, steps]: sample b's draws do not depend on B. Step-major copy,
        # so that each step reads one contiguous row.
        if noise is None:
            noise = torch.rand(B, N - n0, generator=generator,
                               device=generator.device if generator is not None else "cpu")
        elif not isinstance(noise, torch.Tensor) or not noise.is_floating_point() \
                or tuple(noise.shape) != (B, N - n0):
            raise ValueError(f"noise must be a float tensor of shape [{B}, {N - n0}] (batch, image tokens "
                             f"to sample), got {getattr(noise, 'dtype', type(noise).__name__)} "
                             f"{list(getattr(noise, 'shape', []))}")
        noise = noise.to(device).t().contiguous()

        was_training = self.training
        self.eval()
        try:
            out = torch.empty(B, N, dtype=torch.long, device=device)
            if n0:
                out[:, :n0] = prime[:B]
            cache = self.new_cache()
            logits = self.prefill(text, cache, prime)
            log_probs = torch.zeros(2 if guided else 1, B, device=device)
            for i in range(n0, N):
                model_logits = logits.float()
                if guided:
                    cond, uncond = model_logits.chunk(2)
                    logits = uncond + guidance_scale * (cond - uncond)
                tok = sample_logits(logits, noise[i - n0], temperature, top_k, top_p)
                if return_log_probs:
                    log_probs += _token_log_probs(model_logits, tok.repeat(2) if guided else tok).view(-1, B)
                out[:, i] = tok
                if callback is not None:
                    callback(i, out)
                if i + 1 < N:
                    logits = self.step(tok.repeat(2) if guided else tok, i, cache)
        finally:
            self.train(was_training)
        if not return_log_probs:
            return out.view(B, g, g)
        if not guided:
            log_probs = torch.cat([log_probs, torch.full_like(log_probs, float("nan"))])
        return out.view(B, g, g), log_probs.t().cpu()

    @torch.no_grad()
    def log_likelihood(self, text: torch.Tensor, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Teacher-forced log p(codes | text) summed over image codes start.. -> float [B] (eval mode;
        the null caption is `torch.full_like(text, config.pad_id)`)."""
        text = self.check_text(text)
        codes = self.check_codes(codes, text.shape[0])
        was_training = self.training
        self.eval()
        try:
            device = self.text_emb.weight.device
            _, logits = self.logits(text.to(device), codes.to(device))
        finally:
            self.train(was_training)
        flat = codes.flatten(1).to(device)[:, start:]
        return _token_log_probs(logits[:, start:].float().flatten(0, 1), flat.flatten()).view(flat.shape).sum(1).cpu()

    # ---- bookkeeping -------------------------------------------------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; exclude_embeddings drops the lookup tables (tied heads count as embeddings)."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    @classmethod
    def from_pretrained(cls, directory) -> "DALLE":
        model = cls(io.load_config(directory, DALLEConfig))
        return io.load_weights(directory, model)

    def save_pretrained(self, directory, state_dict: Optional[dict] = None):
        return io.save_pretrained(directory, self.config, self.state_dict() if state_dict is None else state_dict)
