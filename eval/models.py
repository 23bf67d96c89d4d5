"""The models a benchmark scores: anything that turns token pairs into log-likelihoods.

`LogLikelihoodModel` is all eval/scoring.py needs of a model, `GenerativeModel` all that
eval/generation.py needs. `TransformerLogLikelihood` wraps our native Transformer,
`HFLogLikelihood` a Hugging Face causal LM, so an exported model can be compared with the
native one on identical token requests. Each has two ways to score: request by request as
lm-evaluation-harness does, and (given the requests' groups, e.g. one multiple-choice item's
choices) one forward of the shared context per group (eval/shared_context.py), through a
`CachedLM` adapter (`TransformerCachedLM`, `HFCachedLM`) that greedy decoding uses too. `load_native` / `load_hf` return a
scorer with the tokenizer it must be scored with: a checkpoint's tokenizer is checked to be the
one its run was trained with, a Hugging Face directory's is its own tokenizer.json.

"""

from __future__ import annotations

import copy
import inspect
import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch.distributed.tensor import DTensor

from common.device import resolve_device
from data.tokenizer import TokenizerMismatchError, load_tokenizer
from eval.generation import greedy_generate
from eval.shared_context import TokenRequest, score_positions, shared_context_loglikelihood
from model.load import checkpoint_tokenizer, load_model
from model.transformer import KVCache


@runtime_checkable
class LogLikelihoodModel(Protocol):
    """Scores continuations: for each (context, continuation) token pair, the sum over the
    continuation's tokens of log p(token | everything before it), and whether every
    continuation token is the model's argmax (greedy) prediction. Requests with the same
    `groups` id may be scored together (one forward of their common prefix); the results are
    the same."""

    max_seq_len: int

    def loglikelihood(
        self, requests: list[TokenRequest], groups: Sequence[int] | None = None
    ) -> list[tuple[float, bool]]: ...


@runtime_checkable
class GenerativeModel(Protocol):
    """Greedy continuations of token prompts (new tokens only), each ending where `stop`
    (tokens so far -> bool) says or after max_new_tokens."""

    max_seq_len: int

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        stop: Callable[[list[int]], bool] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[list[int]]: ...


class _BatchedLogLikelihood(ABC):
    """lm-eval's `_loglikelihood_tokens` for a model that maps tokens (B, T) -> logits (B, T, V).

    Requests are sorted by total length (longest first, so an out-of-memory shows at once),
    batched, right-padded to the longest in the batch. The model input is
    (context + continuation)[-(max_seq_len + 1):][:-1], i.e. the context is truncated on the
    left so the whole continuation is always scored (a continuation longer than max_seq_len
    keeps its last max_seq_len tokens, with a warning). Right padding is safe for a causal model:
    no real position attends to a pad.
    """

    def __init__(self, max_seq_len: int, batch_size: int, device: torch.device):
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.device = device

    @abstractmethod
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 on self.device -> logits (B, T, V)."""

    def logits_at(self, tokens: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        """Logits (N, V) at positions (rows[k], cols[k]) only; override to skip the rest."""
        return self.logits(tokens)[rows, cols]

    cached: Any = None  # the CachedLM adapter of the shared-context path and of decoding

    def loglikelihood(
        self, requests: list[TokenRequest], groups: Sequence[int] | None = None
    ) -> list[tuple[float, bool]]:
        if groups is None or self.cached is None:
            return self.each(requests)
        return shared_context_loglikelihood(
            self.cached, requests, groups, self.max_seq_len, self.batch_size, self.device,
            self.each,
        )

    def generate(self, prompts, max_new_tokens, stop=None, progress=None) -> list[list[int]]:
        return greedy_generate(
            self.cached, prompts, max_new_tokens, self.max_seq_len, self.device,
            self.batch_size, stop, progress,
        )

    @torch.inference_mode()
    def each(self, requests: list[TokenRequest]) -> list[tuple[float, bool]]:
        """Request by request, as lm-eval's `_loglikelihood_tokens`."""
        inputs, targets, too_long = [], [], 0
        for i, (ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"request {i}: empty continuation")
            if not ctx:
                raise ValueError(f"request {i}: empty context (encode_pair puts eot there)")
            inputs.append((list(ctx) + list(cont))[-(self.max_seq_len + 1) :][:-1])
            if len(cont) > self.max_seq_len:
                # Only the last max_seq_len continuation tokens can be predicted inside the
                # window; score those (lm-eval has no defined behaviour here). Rare: it needs
                # an answer longer than the model's context.
                too_long += 1
                cont = cont[-self.max_seq_len :]
            targets.append(list(cont))
        if too_long:
            warnings.warn(
                f"{too_long} continuation(s) longer than max_seq_len {self.max_seq_len}: "
                "scored on their last max_seq_len tokens",
                stacklevel=2,
            )
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(inputs[batch[0]])  # longest first: the batch's padded width
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                tokens[row, : len(inputs[i])] = torch.tensor(inputs[i])
            # Position t predicts token t + 1, so a continuation of n_cont tokens is predicted
            # by the last n_cont input positions: those positions of every sequence make one
            # (N, V) block (N = total continuation tokens).
            rows, cols, target = [], [], []
            for row, i in enumerate(batch):
                n_in, n_cont = len(inputs[i]), len(targets[i])
                rows += [row] * n_cont
                cols += range(n_in - n_cont, n_in)
                target += targets[i]
            dev = self.device
            rows_t = torch.tensor(rows, device=dev)
            target_t = torch.tensor(target, device=dev)
            logits = self.logits_at(tokens.to(dev), rows_t, torch.tensor(cols, device=dev))
            for row, score in enumerate(score_positions(logits, target_t, rows_t, len(batch))):
                results[batch[row]] = score
        return results  # type: ignore[return-value]


class TransformerLogLikelihood(_BatchedLogLikelihood):
    """Our model/transformer.py Transformer (forward(tokens) -> logits (B, T, V))."""

    def __init__(self, model: torch.nn.Module, batch_size: int = 16):
        device = next(model.parameters()).device
        super().__init__(model.cfg.max_seq_len, batch_size, device)
        self.model = model
        # A model sharded by parallel/ (DTensor parameters: FSDP, TP) forwards whole
        # sequences only; its KV cache would be sharded too.
        if not any(isinstance(p, DTensor) for p in model.parameters()):
            self.cached = TransformerCachedLM(model)

    def loglikelihood(self, requests, groups=None) -> list[tuple[float, bool]]:
        # Eval mode while scoring, then back to what it was (eval runs inside training too).
        was_training = self.model.training
        self.model.eval()
        try:
            return super().loglikelihood(requests, groups)
        finally:
            self.model.train(was_training)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def logits_at(self, tokens: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        # Project only the scored positions: (B, T, V) logits would be 8 GB at batch 16,
        # 2048 tokens and a 128k vocabulary in bf16.
        hidden = self.model(tokens, return_hidden=True)  # (B, T, dim)
        return self.model.output(hidden[rows, cols])  # (N, V)


class HFLogLikelihood(_BatchedLogLikelihood):
    """A Hugging Face AutoModelForCausalLM (e.g. our export loaded by transformers)."""

    def __init__(self, model, batch_size: int = 16, max_seq_len: int | None = None):
        device = next(model.parameters()).device
        max_len = max_seq_len or model.config.max_position_embeddings
        super().__init__(max_len, batch_size, device)
        self.model = model.eval()
        try:
            self.cached = HFCachedLM(self.model)
        except ValueError as e:  # no exact shortcut for this model: request by request
            warnings.warn(f"{e}; scoring request by request", stacklevel=2)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kw,
    ) -> HFLogLikelihood:
        import transformers
        from transformers import AutoModelForCausalLM  # optional dependency ([hf] extra)

        # transformers renamed torch_dtype to dtype in 4.56.
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        model = AutoModelForCausalLM.from_pretrained(path, **{key: dtype})
        return cls(model.to(resolve_device(device)), **kw)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits

    def logits_at(self, tokens: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        if self.cached is None:  # logits not a projection of the hidden states alone
            return super().logits_at(tokens, rows, cols)
        # Project only the scored positions (the full (B, T, V) logits are most of the cost
        # at SmolLM2's 49k vocabulary).
        hidden = self.cached.base(input_ids=tokens).last_hidden_state  # (B, T, dim)
        return self.cached.project(hidden[rows, cols])


# ---------------------------------------------------------------------------------------------
# The KV-cache adapters (eval/shared_context.py's CachedLM)
# ---------------------------------------------------------------------------------------------


class TransformerCachedLM:
    """Our model/transformer.py Transformer with its static KVCache, whose entries sit at the
    token's position: a continuation at positions L, L+1, ... of a row whose prefix has L
    real tokens overwrites that row's padding before anyone reads it (the cache's rule)."""

    packs = True  # the cache path's attention takes any mask (KVCache.step's `visible`)

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def prefill(self, tokens: torch.Tensor, extra: int):
        """tokens: (B, T) prefixes, right-padded; the cache keeps T + extra entries."""
        cache = self.model.new_cache(tokens.shape[0], tokens.shape[1] + extra)
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return cache, self.model(tokens, cache=cache.step(positions), return_hidden=True)

    def select(self, cache: KVCache, rows: torch.Tensor, lengths: torch.Tensor) -> KVCache:
        """A copy of prefix rows `rows` (R,) for R continuations; the continuations' positions
        (from `lengths`) decide what each sees."""
        return KVCache([k[rows] for k in cache.k], [v[rows] for v in cache.v])

    def extend(self, state: KVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions: (R, t); a token sees its row's entries 0 .. its position."""
        kv_len = min(int(positions.max()) + 1, state.max_len)  # fewer entries read: faster
        return self.model(tokens, cache=state.step(positions, kv_len), return_hidden=True)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.output(hidden)

    def packed(self, tokens: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor):
        """tokens, positions (R, W), visible (R, W, W): a fresh cache of W entries, token t
        written to entry t (its position is only for RoPE)."""
        R, W = tokens.shape
        cache = self.model.new_cache(R, W)
        write = torch.arange(W, device=tokens.device).expand(R, W)
        step = cache.step(positions, W, write, visible)
        return self.model(tokens, cache=step, return_hidden=True)


@dataclass
class _HFState:
    cache: Any  # transformers DynamicCache
    mask: torch.Tensor  # (R, slots so far) 1 = a real key


class HFCachedLM:
    """A Hugging Face causal LM: its base model with past_key_values, an attention mask with
    the pad slots zeroed and explicit position_ids; the output embedding projects."""

    def __init__(self, model):
        if getattr(model.config, "final_logit_softcapping", None):
            raise ValueError(
                f"{type(model).__name__} caps its logits: projecting hidden states with the "
                "output embedding alone would not give its logits"
            )
        self.model = model
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        # A custom 4D mask is honoured by the eager and sdpa attentions only (flash-attention
        # and flex take other masks): other models score every item through the cache path.
        impl = getattr(model.config, "_attn_implementation", None) or "eager"
        self.packs = impl in ("eager", "sdpa")
        # transformers 5.2x renamed the forward's past_key_values to cache.
        params = inspect.signature(self.base.forward).parameters
        self.cache_key = "cache" if "cache" in params else "past_key_values"

    def prefill(self, tokens: torch.Tensor, extra: int):
        out = self.base(input_ids=tokens, use_cache=True)
        return (out[self.cache_key], tokens.shape[1]), out.last_hidden_state

    def select(self, cache, rows: torch.Tensor, lengths: torch.Tensor) -> _HFState:
        past, filled = cache
        # batch_select_indices works in place: on a copy whose layers are copies, it leaves
        # the prefill's tensors to the pool's next selection (transformers >= 4.56 keeps a
        # cache's tensors in .layers; before, a deep copy).
        if hasattr(past, "layers"):
            past = copy.copy(past)
            past.layers = [copy.copy(layer) for layer in past.layers]
        else:
            past = copy.deepcopy(past)
        past.batch_select_indices(rows)
        slot = torch.arange(filled, device=rows.device)
        return _HFState(past, (slot[None] < lengths[:, None]).long())

    def extend(self, state: _HFState, tokens: torch.Tensor, positions: torch.Tensor):
        ones = torch.ones(tokens.shape, dtype=state.mask.dtype, device=tokens.device)
        state.mask = torch.cat([state.mask, ones], dim=1)
        out = self.base(
            input_ids=tokens, attention_mask=state.mask, position_ids=positions,
            use_cache=True, **{self.cache_key: state.cache},
        )
        return out.last_hidden_state

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def packed(self, tokens: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor):
        """A 4D mask goes to the attention as it is (transformers' custom-mask contract): the
        additive form (0 seen, the dtype's minimum hidden) serves eager and sdpa alike."""
        dtype = self.head.weight.dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        out = self.base(input_ids=tokens, attention_mask=mask[:, None], position_ids=positions,
                        use_cache=False)
        return out.last_hidden_state


# ---------------------------------------------------------------------------------------------
# Loading a model and the tokenizer to score it with (used by `python -m eval`)
# ---------------------------------------------------------------------------------------------


def check_checkpoint_tokenizer(ckpt: Path, tokenizer, model_vocab_size: int) -> None:
    """Stop when `tokenizer` differs from the one the checkpoint's run was trained with.

    The run's tokenizer identity is in `<run>/run_info.json` (the data manifest train.py saved
    at the start of the run); the tokenizer at hand comes from today's data dir, which may have
    been re-prepared since. Scores with another tokenizer would be meaningless.
    """
    info_path = Path(ckpt).parent.parent / "run_info.json"
    if info_path.is_file():
        trained = json.loads(info_path.read_text()).get("manifest", {}).get("tokenizer")
        here = tokenizer.identity()
        if trained and trained.get("sha256") != here["sha256"]:
            raise TokenizerMismatchError(
                f"checkpoint {ckpt} was trained with tokenizer {trained.get('name')!r} "
                f"({trained.get('n_vocab')} ids, sha256 {trained.get('sha256', '')[:12]}, see "
                f"{info_path}), but the tokenizer given is {here['name']!r} ({here['n_vocab']} "
                f"ids, sha256 {here['sha256'][:12]}); evaluate with the run's data dir or "
                f"tokenizer file"
            )
    if tokenizer.n_vocab > model_vocab_size:
        raise TokenizerMismatchError(
            f"checkpoint {ckpt}: the tokenizer has {tokenizer.n_vocab} ids but the model only "
            f"{model_vocab_size} (model.vocab_size): not the tokenizer it was trained with"
        )


def native_tokenizer(ckpt: Path, cfg, tokenizer_spec: str | None = None):
    """The tokenizer to score a checkpoint with: `tokenizer_spec` (a data.tokenizer spec) or
    the one the checkpoint records (its data dir's, or an imported run's own "hf:" one; model.load.checkpoint_tokenizer, which refuses
    another identity); checkpoints that record none are checked against run_info.json."""
    tokenizer = checkpoint_tokenizer(ckpt, cfg, tokenizer_spec)
    check_checkpoint_tokenizer(ckpt, tokenizer, cfg.model.vocab_size)
    return tokenizer


def load_native(
    checkpoint: str | Path,
    device: str | torch.device = "cpu",
    tokenizer_spec: str | None = None,
    batch_size: int = 16,
    step: int | None = None,
) -> tuple[TransformerLogLikelihood, object, Path]:
    """(scorer, tokenizer, checkpoint dir) for a checkpoint dir or a run dir (its checkpoint
    `step`, default the newest); see `native_tokenizer` for the tokenizer."""
    model, cfg, ckpt = load_model(checkpoint, device, step=step)
    tokenizer = native_tokenizer(ckpt, cfg, tokenizer_spec)
    return TransformerLogLikelihood(model, batch_size), tokenizer, ckpt


def load_hf(
    path: str | Path,
    device: str | torch.device = "cpu",
    tokenizer_spec: str | None = None,
    batch_size: int = 16,
) -> tuple[HFLogLikelihood, object]:
    """(scorer, tokenizer) for a Hugging Face model dir; the tokenizer is the dir's
    tokenizer.json unless `tokenizer_spec` names one of ours."""
    tokenizer = load_tokenizer(tokenizer_spec or f"hf:{path}")
    return HFLogLikelihood.from_pretrained(path, device, batch_size=batch_size), tokenizer
