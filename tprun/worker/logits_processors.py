"""The logits processors of vLLM's sampler, batched: each builds index tensors on the host from the
rows that use it and touches the logits once, so a feature costs nothing for rows that do not ask.

Order (vLLM v1): allowed_token_ids, bad_words, structured-output mask, min_tokens, logit_bias, then the
penalties (repetition: multiplicative over prompt + output tokens, as HF; presence/frequency: additive
over output tokens, OpenAI's formula). Temperature, min_p, top-k and top-p follow in the sampler.
"""

from __future__ import annotations

import torch

from tprun.worker.step import SeqStep, StepInput

NEG_INF = float("-inf")


def process_logits(logits: torch.Tensor, step: StepInput, rows: list[int], to_device,
                   bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """logits: [len(rows), vocab] float, rows[i] = index into step.seqs; modified in place and returned.
    bitmask: the step's structured-output masks (rows step.token_bitmask_rows)."""
    seqs = [step.seqs[r] for r in rows]
    vocab = logits.shape[-1]
    _allowed(logits, seqs, to_device)
    banned_rows, banned_ids = [], []
    for i, s in enumerate(seqs):
        for tok in _bad_word_bans(s):
            banned_rows.append(i)
            banned_ids.append(tok)
        if s.num_generated < s.sampling.min_tokens:
            for tok in s.sampling.min_tokens_blocked:
                banned_rows.append(i)
                banned_ids.append(tok)
    _mask_pairs(logits, banned_rows, banned_ids, vocab, to_device)
    if bitmask is not None:
        from tprun.worker.bitmask import apply_token_bitmask

        where = {r: j for j, r in enumerate(step.token_bitmask_rows)}
        mine = [(i, where[r]) for i, r in enumerate(rows) if r in where]
        if mine:
            local, masks = zip(*mine)
            apply_token_bitmask(logits, bitmask[list(masks)].to(logits.device), to_device(list(local), torch.long))
    _logit_bias(logits, seqs, to_device)
    _penalties(logits, seqs, to_device)
    return logits


def _allowed(logits: torch.Tensor, seqs: list[SeqStep], to_device) -> None:
    pairs = [(i, t) for i, s in enumerate(seqs) if s.sampling.allowed_token_ids is not None
             for t in s.sampling.allowed_token_ids]
    if not pairs:
        return
    keep = torch.ones((len(seqs), logits.shape[-1]), dtype=torch.bool, device=logits.device)
    keep[to_device(sorted({i for i, _ in pairs}), torch.long)] = False
    r, t = zip(*pairs)
    keep[to_device(list(r), torch.long), to_device(list(t), torch.long)] = True
    logits.masked_fill_(~keep, NEG_INF)


def _bad_word_bans(s: SeqStep) -> list[int]:
    """A bad word's last token is banned when the tokens before it end the output so far (vLLM: only
    generated tokens count, not the prompt)."""
    out = s.output_token_ids
    bans = []
    for word in s.sampling.bad_words_ids:
        prefix = word[:-1]
        if len(prefix) <= len(out) and (not prefix or tuple(out[len(out) - len(prefix):]) == prefix):
            bans.append(word[-1])
    return bans


def _mask_pairs(logits: torch.Tensor, rows: list[int], ids: list[int], vocab: int, to_device) -> None:
    keep = [(r, t) for r, t in zip(rows, ids) if t < vocab]
    if keep:
        r, t = zip(*keep)
        logits[to_device(list(r), torch.long), to_device(list(t), torch.long)] = NEG_INF


def _logit_bias(logits: torch.Tensor, seqs: list[SeqStep], to_device) -> None:
    triples = [(i, t, b) for i, s in enumerate(seqs) for t, b in s.sampling.logit_bias]
    if not triples:
        return
    r, t, b = zip(*triples)
    logits.index_put_((to_device(list(r), torch.long), to_device(list(t), torch.long)),
                      to_device(list(b), logits.dtype), accumulate=True)


def _penalties(logits: torch.Tensor, seqs: list[SeqStep], to_device) -> None:
    idx = [i for i, s in enumerate(seqs) if s.sampling.has_penalties]
    if not idx:
        return
    vocab = logits.shape[-1]
    sub = logits[to_device(idx, torch.long)]
    params = [seqs[i].sampling for i in idx]
    out_counts = _counts([seqs[i].output_token_ids for i in idx], vocab, logits, to_device)
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = out_counts > 0
        seen |= _counts([seqs[i].prompt_token_ids for i in idx], vocab, logits, to_device) > 0
        rep = to_device([p.repetition_penalty for p in params], logits.dtype)[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = to_device([p.frequency_penalty for p in params], logits.dtype)[:, None]
    pres = to_device([p.presence_penalty for p in params], logits.dtype)[:, None]
    sub = sub - freq * out_counts - pres * (out_counts > 0).to(logits.dtype)
    logits[to_device(idx, torch.long)] = sub


def _counts(token_lists: list[list[int]], vocab: int, like: torch.Tensor, to_device) -> torch.Tensor:
    """[rows, vocab] occurrence counts; ids outside the vocabulary (none should exist) are dropped."""
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros((len(token_lists), vocab + 1), dtype=like.dtype, device=like.device)
    if width:
        padded = [list(t) + [vocab] * (width - len(t)) for t in token_lists]
        ids = to_device(padded, torch.long).clamp_(0, vocab)
        counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=like.dtype, device=like.device))
    return counts[:, :vocab]
