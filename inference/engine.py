"""The generation engine: batched decoding over a static KV cache, with ragged prompts,
per-sequence sampling and stops, streaming, and speculative decoding.

    engine = Engine(model, tokenizer, max_batch=8)
    seqs = engine.generate([ids_a, ids_b], SamplingParams(max_new_tokens=64, temperature=0))
    seqs[0].generated, seqs[0].text, seqs[0].finish_reason

The cache holds `max_batch` slots of `max_len` positions (model/transformer.py's KVCache: every
row has its own positions, so prompts of any lengths share a forward with no position padding).
A sequence takes a free slot when it is admitted (`submit` queues it; `step` admits and
advances every running sequence by one round), which is also how the server batches requests
that arrive while others run (continuous batching). Each forward feeds every sequence the
tokens its cache does not hold yet: a whole prompt (prefill), one token (decode), or the last
token and k drafts (speculative verification). Rows shorter than the longest are padded with
writes into one extra cache entry that no query sees.

Speculative decoding (draft=...): the draft model proposes k tokens one at a time, the target
scores all of them in one forward, and inference/sampling.py's rule accepts a prefix; greedy
decoding gives the target's greedy tokens exactly. The draft may also be an NgramDraft
(inference/ngram.py: proposals copied from the sequence itself, no forward; a round where no
sequence has one is a plain step) or an EagleDraft (inference/eagle.py: one layer on the
target's own features, which every target forward then keeps for it: Sequence.features holds
those of the positions the draft's cache lacks). engine.stats counts proposals and acceptances.

torch.compile (compile=True) compiles the forwards of a few tokens per row: the plain decode
step, and with a draft its steps and the target's verification of k drafts; each runs every
slot over every cache entry (fixed shapes: one graph per model and row length, at most
1, 2 and k + 1; 1 and k + 1 with an n-gram or EAGLE draft, whose own steps stay eager).
Prefills stay eager. It pays where per-op overhead dominates, as at batch 1 on a CPU
(bench/generate.py measures it).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from inference.eagle import EagleDraft
from inference.ngram import NgramDraft
from inference.sampling import Sampler, SamplingParams, accept, distributions, inverse_cdf
from model.transformer import KVCache, Transformer


class TextStream:
    """Incremental text of a sequence's tokens: deltas safe to show (an unfinished UTF-8
    character or the start of a stop string is held back), the text cut at a stop string."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stop_strings
        self.ids: list[int] = []
        self.text = ""  # the text so far (final once the sequence is done)
        self.sent = 0  # characters of it handed out as deltas

    def push(self, token: int) -> tuple[str, bool]:
        """(new text safe to show, whether a stop string ended the sequence)."""
        if self.tokenizer is None:
            return "", False
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self.flush(), True
        self.text = text
        safe = len(text.rstrip("\ufffd"))  # the replacement char of an incomplete byte sequence
        for s in self.stops:  # hold back a tail that could still grow into a stop string
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:n]):
                    safe -= n
                    break
        return self._take(max(safe, self.sent)), False

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        delta, self.sent = self.text[self.sent : upto], upto
        return delta


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    on_token: Callable | None = None  # on_token(seq, token id or None at the end, text delta)
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    cancelled: bool = False  # set from any thread (a client went away); honoured at the next step
    slot: int = -1
    cached: int = 0  # positions of `tokens` held by the target's cache
    draft_cached: int = 0  # ... by the draft's
    features: torch.Tensor | None = None  # EAGLE: the target's features (n, dim) of positions
    features_at: int = 0  # features_at .. features_at + n - 1 (draft_cached .. cached - 1)
    submitted: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    sampler: Sampler | None = None
    stream: TextStream | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.stream.text if self.stream else ""


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        max_batch: int = 8,
        max_len: int | None = None,
        draft: Transformer | NgramDraft | EagleDraft | None = None,
        speculate_k: int = 4,
        compile: bool = False,
    ):
        cfg = model.cfg
        self.model, self.tokenizer, self.draft, self.k = model, tokenizer, draft, speculate_k
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        self.trash = self.max_len  # the extra cache entry padding writes to
        self.cache = self._allocate(model.cfg, model, max_batch)
        if draft is not None and speculate_k < 1:
            raise ValueError(f"speculate_k = {speculate_k}: expected >= 1")
        if isinstance(draft, Transformer):
            if draft.cfg.vocab_size != cfg.vocab_size or draft.cfg.max_seq_len < self.max_len:
                raise ValueError(
                    f"draft model: vocab_size {draft.cfg.vocab_size} / max_seq_len "
                    f"{draft.cfg.max_seq_len}, expected vocab_size {cfg.vocab_size} and "
                    f"max_seq_len >= {self.max_len} (the same tokenizer, as long a context)"
                )
            self.draft_cache = self._allocate(draft.cfg, draft, max_batch)
        if isinstance(draft, EagleDraft):
            if draft.cfg.dim != cfg.dim or int(draft.vocab.max()) >= cfg.vocab_size:
                raise ValueError(f"EAGLE draft: dim {draft.cfg.dim} and ids up to {int(draft.vocab.max())}, "
                                 f"expected the target's dim {cfg.dim} and ids < {cfg.vocab_size}")
            self.draft_cache = self._allocate(draft.cfg, model, max_batch)  # in the target's dtype
        self.slots: list[Sequence | None] = [None] * max_batch
        self.waiting: deque[Sequence] = deque()
        self.stats: Counter = Counter()
        self._compiled = torch.compile(self._forward_full, dynamic=False) if compile else None
        self._compiled_lengths = {1, speculate_k + 1} if draft is not None else {1}
        if isinstance(draft, Transformer):  # its steps feed 1 token, or 2 after a full accept
            self._compiled_lengths.add(2)

    def _allocate(self, cfg, model: Transformer, batch: int) -> KVCache:
        """A cache of cfg's shapes in `model`'s activation dtype and device."""
        p = model.norm.weight  # activations' dtype and device, in a quantized model too
        return KVCache.allocate(cfg, batch, self.max_len + 1, p.dtype, p.device)

    @property
    def eagle(self) -> bool:
        return isinstance(self.draft, EagleDraft)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    # --- requests ---------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, on_token: Callable | None = None) -> Sequence:
        """Queue a sequence; `step` admits it when a slot is free."""
        vocab = self.model.cfg.vocab_size
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        if len(prompt) >= self.max_len:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens leaves no room to generate (the context holds {self.max_len})"
            )
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        seq = Sequence(list(prompt), params, on_token, tokens=list(prompt), submitted=time.perf_counter())
        seq.sampler = Sampler(params, vocab)
        seq.stream = TextStream(self.tokenizer, params.stop_strings) if self.tokenizer else None
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer")
        self.waiting.append(seq)
        return seq

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
        on_token: Callable | None = None,
    ) -> list[Sequence]:  # fmt: skip
        """Run the prompts to completion (more than max_batch queue for free slots)."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.submit(p, sp, on_token) for p, sp in zip(prompts, params)]
        while not all(s.done for s in seqs):
            self.step()
        return seqs

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def free_slots(self) -> int:
        return sum(s is None for s in self.slots) - len(self.waiting)

    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting sequences into free slots (prefill: their first token), then advance
        every running sequence by one decode round."""
        self._release()
        admitted = []
        for i, owner in enumerate(self.slots):
            if owner is None and self.waiting:
                seq = self.waiting.popleft()
                seq.slot, self.slots[i] = i, seq
                admitted.append(seq)
        if admitted:
            self._decode(admitted)  # prefill: each gets its first token
        running = [s for s in self.slots if s is not None and not s.done]
        if running:
            self._speculate(running) if self.draft is not None else self._decode(running)
        self._release()

    def fail_all(self) -> None:
        """End every sequence with finish reason "error" (after a failed step)."""
        for s in [*self.waiting, *self.slots]:
            if s is not None and not s.done:
                s.finish_reason, s.finished_at = "error", time.perf_counter()
                if s.on_token is not None:
                    s.on_token(s, None, "")
        self._release()

    def _release(self) -> None:
        """Free the slots of finished sequences; finish the cancelled ones."""
        for s in [*self.waiting, *self.slots]:
            if s is not None and s.cancelled and not s.done:
                s.finish_reason, s.finished_at = "cancelled", time.perf_counter()
        self.waiting = deque(s for s in self.waiting if not s.done)
        self.slots = [None if s is None or s.done else s for s in self.slots]

    # --- forwards ---------------------------------------------------------------------------

    def _layout(self, seqs, pending: list[list], attr: str):
        """Rows min slot .. max slot of one forward: sequence i's tokens pending[i] at positions
        getattr(seq, attr) onward, which become cached (attr advances); shorter rows padded,
        their writes aimed at the trash entry. -> (lo, tokens, positions, write), each (rows, T)."""
        lo, hi = min(s.slot for s in seqs), max(s.slot for s in seqs) + 1
        T = max(len(p) for p in pending)
        tokens = [[0] * T for _ in range(hi - lo)]
        positions = [[0] * T for _ in range(hi - lo)]
        write = [[self.trash] * T for _ in range(hi - lo)]
        for s, toks in zip(seqs, pending):
            r, start, n = s.slot - lo, getattr(s, attr), len(toks)
            tokens[r][:n] = toks
            positions[r][:n] = write[r][:n] = range(start, start + n)
            setattr(s, attr, start + n)
        return lo, *(torch.tensor(x) for x in (tokens, positions, write))

    def _feed(self, model, cache, seqs, attr: str, extra=None, every_position=False):
        """Feed each sequence the tokens at positions getattr(seq, attr) onward (its tokens,
        plus extra[i] not yet appended); that many positions become cached. Returns per
        sequence the logits (V,) after its last token, or (n, V) at every fed position. With an
        EAGLE draft the target's features at the fed positions join Sequence.features."""
        extra = extra or [[] for _ in seqs]
        pending = [(s.tokens + e)[getattr(s, attr) :] for s, e in zip(seqs, extra)]
        lo, tokens, positions, write = self._layout(seqs, pending, attr)
        keep = self.eagle and model is self.model
        if self._compiled is not None and tokens.shape[1] in self._compiled_lengths:
            self._count(len(seqs))
            logits, hidden = self._forward_padded(model, cache, tokens, positions, write, lo)  # (B, T, V)
            if keep:
                self._keep_features(seqs, [hidden[s.slot, : len(p)] for s, p in zip(seqs, pending)])
            if every_position:
                return [logits[s.slot, : len(p)] for s, p in zip(seqs, pending)]
            return [logits[s.slot, len(p) - 1] for s, p in zip(seqs, pending)]
        step = self._rows_step(cache, lo, positions, write)
        hidden = model(tokens.to(self.device), cache=step, return_hidden=True)  # (B, T, dim)
        self._count(len(seqs))
        if keep:
            self._keep_features(seqs, [hidden[s.slot - lo, : len(p)] for s, p in zip(seqs, pending)])
        if every_position:
            return [model.output(hidden[s.slot - lo, : len(p)]) for s, p in zip(seqs, pending)]
        return list(model.output(hidden[self._last(seqs, pending, lo)]))  # the head only where needed

    def _rows_step(self, cache: KVCache, lo: int, positions, write):
        """An eager forward's view of the cache: rows lo .. lo + rows, entries up to the last
        position (fewer than a compiled step reads)."""
        rows = cache.rows(lo, lo + positions.shape[0])
        return rows.step(positions.to(self.device), int(positions.max()) + 1, write.to(self.device))

    @staticmethod
    def _last(seqs, pending: list[list], lo: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) indices of each sequence's last fed position in a forward's output."""
        return torch.tensor([s.slot - lo for s in seqs]), torch.tensor([len(p) - 1 for p in pending])

    @staticmethod
    def _keep_features(seqs, rows: list[torch.Tensor]) -> None:
        """Append each sequence's new features (n, dim): they follow its kept ones."""
        for s, r in zip(seqs, rows):
            s.features = r if s.features is None else torch.cat([s.features, r])

    def _forward_padded(self, model, cache, tokens, positions, write, lo):
        """A compiled forward runs every slot (fixed shapes): rows of no sequence here write to
        the trash entry."""
        B, T = cache.batch, tokens.shape[1]
        full = [torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long),
                torch.full((B, T), self.trash, dtype=torch.long)]  # fmt: skip
        for t, part in zip(full, (tokens, positions, write)):
            t[lo : lo + part.shape[0]] = part
        # one graph per (model, cache, length) of every compiled engine in the process share
        # this function's code object; dynamo's default of 8 would run the rest eagerly
        with torch._dynamo.config.patch(recompile_limit=64):
            return self._compiled(model, cache, *(t.to(self.device) for t in full))  # (B, T, V), (B, T, dim)

    def _count(self, rows: int) -> None:
        self.stats["forwards"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], rows)

    @staticmethod
    def _forward_full(model, cache, tokens, positions, write):
        hidden = model(tokens, cache=cache.step(positions, None, write), return_hidden=True)
        return model.output(hidden), hidden

    # --- sampling ---------------------------------------------------------------------------

    def _probs(self, seqs, logits: list[torch.Tensor], contexts: list[list[list[int]]]):
        """logits[i] (P_i, V) of sequence i at P_i positions, contexts[i][j] the tokens before
        its position j -> their probabilities, one batched call per kind of sampling."""
        groups: dict = {}
        for i, s in enumerate(seqs):
            groups.setdefault(s.sampler.key, []).append(i)
        out: list = [None] * len(seqs)
        for idx in groups.values():
            rows = torch.cat([logits[i] for i in idx])
            ctx = [c for i in idx for c in contexts[i]]
            probs = distributions(seqs[idx[0]].sampler, rows, ctx)
            for i, chunk in zip(idx, probs.split([logits[i].shape[0] for i in idx])):
                out[i] = chunk
        return out

    def _draw(self, seqs, logits: list[torch.Tensor], extra=None) -> tuple[list, list[int]]:
        """(probabilities (V,), one sampled id) per sequence after its tokens (+ extra[i])."""
        extra = extra or [[] for _ in seqs]
        probs = self._probs(seqs, [x[None] for x in logits], [[s.tokens + e] for s, e in zip(seqs, extra)])
        probs = torch.cat(probs)
        return list(probs), inverse_cdf(probs, [s.sampler.uniform() for s in seqs])

    def _decode(self, seqs: list[Sequence]) -> None:
        _, ids = self._draw(seqs, self._feed(self.model, self.cache, seqs, "cached"))
        for s, t in zip(seqs, ids):
            self._append(s, [t])

    def _speculate(self, running: list[Sequence]) -> None:
        # verification writes positions len - 1 .. len - 1 + k: keep them inside the cache
        k = min([self.k] + [self.max_len - len(s.tokens) for s in running])
        if k < 1:
            return self._decode(running)
        if isinstance(self.draft, NgramDraft):
            drafts = [self.draft.propose(s.tokens, k) for s in running]
            if not any(drafts):  # nothing to copy: a plain step costs less than a verification
                self.stats["rounds without drafts"] += 1
                return self._decode(running)
            drafts = [d or [s.tokens[-1]] * k for s, d in zip(running, drafts)]  # a guess
            q = F.one_hot(torch.tensor(drafts, device=self.device), self.model.cfg.vocab_size)
            q = q.float()  # (N, k, V): certain proposals
        elif self.eagle:
            drafts, q = self._eagle_tokens(running, k)
        else:
            drafts, q = self._draft_tokens(running, k)
        starts = [len(s.tokens) for s in running]
        scores = self._feed(self.model, self.cache, running, "cached", drafts, every_position=True)
        contexts = [[s.tokens + d[:i] for i in range(k + 1)] for s, d in zip(running, drafts)]
        p = torch.stack(self._probs(running, scores, contexts))  # (N, k + 1, V)
        news = accept([s.sampler for s in running], p, q, torch.tensor(drafts))
        for s, new, n in zip(running, news, starts):
            accepted = len(new) - 1
            s.cached = n + accepted  # the target's entries after the accepted drafts are stale
            if self.eagle:  # its entries from the drafts' own features: redone from the target's
                s.draft_cached = n - 1
                s.features = s.features[: s.cached - s.features_at]
            else:
                s.draft_cached = min(s.draft_cached, n + accepted)
            self.stats["proposed"] += k
            self.stats["accepted"] += accepted
            self._append(s, new)

    def _draft_tokens(self, running: list[Sequence], k: int) -> tuple[list[list[int]], torch.Tensor]:
        """The draft model's k tokens per sequence, drawn one at a time, and the distributions
        q (N, k, V) they were drawn from."""
        drafts: list[list[int]] = [[] for _ in running]
        qs: list[list[torch.Tensor]] = [[] for _ in running]
        for _ in range(k):
            logits = self._feed(self.draft, self.draft_cache, running, "draft_cached", drafts)
            probs, ids = self._draw(running, logits, drafts)
            for d, q, pr, t in zip(drafts, qs, probs, ids):
                q.append(pr)
                d.append(t)
        return drafts, torch.stack([torch.stack(x) for x in qs])

    def _eagle_tokens(self, running: list[Sequence], k: int) -> tuple[list[list[int]], torch.Tensor]:
        """The EAGLE head's k tokens per sequence and the distributions q (N, k, V) they were
        drawn from. Its first step feeds the pairs (target feature f_j, token j + 1) its cache
        lacks (j = draft_cached .. cached - 1: the features kept since its last round), each
        later step its own predicted feature and drafted token."""
        V = self.model.cfg.vocab_size
        feats = [s.features for s in running]
        nexts = [s.tokens[s.draft_cached + 1 : s.cached + 1] for s in running]
        drafts: list[list[int]] = [[] for _ in running]
        qs: list[list[torch.Tensor]] = [[] for _ in running]
        for step in range(k):
            lo, tokens, positions, write = self._layout(running, nexts, "draft_cached")
            f = torch.zeros(*tokens.shape, self.model.cfg.dim, dtype=feats[0].dtype, device=self.device)
            for s, x in zip(running, feats):
                f[s.slot - lo, : len(x)] = x
            step_cache = self._rows_step(self.draft_cache, lo, positions, write)
            hidden, logits = self.draft(f, self.model.embed(tokens.to(self.device)), step_cache)
            last = self._last(running, nexts, lo)
            probs, ids = self._draw(running, list(self.draft.full_logits(logits[last], V)), drafts)
            if step == 0:  # the kept features are in the draft's cache now
                for s in running:
                    s.features, s.features_at = None, s.cached
            feats, nexts = list(hidden[last][:, None]), [[t] for t in ids]
            for d, q, pr, t in zip(drafts, qs, probs, ids):
                q.append(pr)
                d.append(t)
        return drafts, torch.stack([torch.stack(x) for x in qs])

    def acceptance_rate(self) -> float:
        return self.stats["accepted"] / max(self.stats["proposed"], 1)

    def _append(self, s: Sequence, new: list[int]) -> None:
        p = s.params
        if s.first_token_at is None:
            s.first_token_at = time.perf_counter()
        for t in new:
            s.tokens.append(t)
            s.generated.append(t)
            self.stats["tokens"] += 1
            stopped_by_token = t in p.stop_tokens
            delta, stopped = ("", False) if stopped_by_token or s.stream is None else s.stream.push(t)
            if s.on_token is not None:
                s.on_token(s, t, delta)
            if stopped_by_token or stopped:
                s.finish_reason = "stop"
            elif len(s.generated) >= p.max_new_tokens or len(s.tokens) >= self.max_len:
                s.finish_reason = "length"
            if s.done:
                s.finished_at = time.perf_counter()
                tail = s.stream.flush() if s.stream is not None else ""
                if s.on_token is not None:
                    s.on_token(s, None, tail)
                return
