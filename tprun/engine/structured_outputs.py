"""Structured output (vLLM's `structured_outputs`): grammars compiled by xgrammar, token masks per step.

Runs in every rank on CPU. A mask is a pure function of (compiled grammar, accepted tokens), and compiling
is a pure function of the request, so every rank builds identical masks without talking to the others.
Compiles run on a small thread pool from the moment a request arrives; the engine waits on the future only
when the request is scheduled, so a slow compile never holds up the running batch, and what is decided
never depends on how long a compile took.

xgrammar was chosen by measurement (benchmarks/NOTES.md, "Structured output: library choice"): it compiles
every kind (JSON schema, regex, choice, EBNF, any JSON object), fills a mask in a few microseconds, and
gave 100 % valid outputs in random walks on our tokenizers.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import version
from typing import Any

import torch
import xgrammar as xgr

from tprun.config import StructuredOutputsParams

LIBRARY = f"xgrammar {version('xgrammar')}"
# xgrammar prefixes its messages with "[hh:mm:ss] /project/cpp/file.cc:123: ": noise for a user.
_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


class StructuredOutputError(ValueError):
    """A schema, regex, choice list or grammar that cannot be compiled; the message names the kind and why."""


def canonical_key(params: StructuredOutputsParams) -> tuple[str, str]:
    """The cache key: equal for requests that must compile to the same grammar.

    JSON schemas are re-serialised compactly but *not* key-sorted: property order decides the order in which
    the grammar emits the fields, so two schemas that differ only in order are different grammars."""
    kind = params.kind
    if kind == "json":
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise StructuredOutputError(f"structured_outputs.json is not valid JSON text ({e}); "
                                            "give a JSON schema object or its JSON text") from None
        if not isinstance(schema, dict):
            raise StructuredOutputError(f"structured_outputs.json must be a JSON schema object, got {type(schema).__name__}")
        return kind, json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if kind == "choice":
        return kind, json.dumps(params.choice, ensure_ascii=False)
    if kind == "json_object":
        return kind, ""
    return kind, getattr(params, kind)


# xgrammar 0.2.9 writes a length-limited JSON string (minLength/maxLength) with the character class
# [^"\\\r\n], which admits raw control characters (a tab, \x03) that JSON forbids inside strings: a
# strict parser rejects the output. Its unlimited strings already use [^\0-\x1f"\\\r\n]; give both that.
_LOOSE_STRING_CHAR = '[^\\"\\\\\\r\\n]'
_STRICT_STRING_CHAR = '[^\\0-\\x1f\\"\\\\\\r\\n]'


def _strict_json_strings(grammar: str) -> str:
    return grammar.replace(_LOOSE_STRING_CHAR, _STRICT_STRING_CHAR)


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose language is exactly `choices` (JSON string escapes are xgrammar's literal escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Matcher:
    """One request's grammar state: which tokens may come next, and the tokens taken so far."""

    def __init__(self, compiled: xgr.CompiledGrammar, stop_token_ids: Sequence[int], vocab_size: int):
        self._matcher = xgr.GrammarMatcher(compiled)
        self._vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False (state unchanged) if the grammar does not allow it."""
        if self._matcher.is_terminated() or not 0 <= token_id < self._vocab_size:
            return False
        return bool(self._matcher.accept_token(int(token_id)))

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (bit j of word i allows token 32*i+j).

        Once the grammar is complete and cannot continue only the stop tokens are allowed; after a stop token
        was accepted the row still allows only them, so a caller that keeps sampling never gets an all-masked row.
        """
        if self._matcher.is_terminated():
            bitmask[row].zero_()
            for t in self._stop_token_ids:
                bitmask[row, t // 32] |= _bit(t % 32)
            return
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        """True once a stop token was accepted after a complete match."""
        return bool(self._matcher.is_terminated())


def _bit(j: int) -> int:
    """Bit j of an int32 word, as the signed value torch stores (bit 31 is the sign bit)."""
    return (1 << j) - (1 << 32) if j == 31 else 1 << j


class StructuredOutputManager:
    """Compiles structured-output requests (once per distinct one) and makes per-request matchers."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int] | None = None,
                 max_workers: int = 2, max_cached: int = 1024):
        """tokenizer: the HF tokenizer; vocab_size: the model's (may exceed the tokenizer's; ids the tokenizer
        lacks are never allowed); eos_token_ids: the model's EOS ids (config / generation_config), which become
        the grammar's stop tokens; defaults to the tokenizer's eos token."""
        if eos_token_ids is None:
            eos_token_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        stop = sorted({int(t) for t in eos_token_ids})
        if not stop:
            raise ValueError("structured output needs the model's EOS token id(s): pass eos_token_ids "
                             "(from config.json / generation_config.json)")
        if stop[0] < 0 or stop[-1] >= vocab_size:
            raise ValueError(f"eos_token_ids {stop} must lie in [0, vocab_size={vocab_size})")
        self.vocab_size = vocab_size
        self.stop_token_ids = stop
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop)
        # Our own cache (below) keys by request; xgrammar's would only hold a second copy.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tprun-grammar")
        # Least recently used compiles are dropped past max_cached: that costs a recompile, never changes a mask.
        self._futures: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._max_cached = max_cached
        self._lock = threading.Lock()
        self._batch = None  # xgrammar's batch filler, made on first use
        self.compile_count = 0  # distinct compiles started; the cache's effect, visible to tests and logs

    def submit(self, params: StructuredOutputsParams) -> Future:
        """Start compiling (or reuse the compile of an equal request). `.result()` gives the compiled grammar
        or raises StructuredOutputError naming the kind and the library's reason."""
        try:
            key = canonical_key(params)
        except StructuredOutputError as e:
            failed: Future = Future()
            failed.set_exception(e)
            return failed
        with self._lock:
            future = self._futures.get(key)
            if future is None:
                self.compile_count += 1
                future = self._futures[key] = self._pool.submit(self._compile, *key)
                if len(self._futures) > self._max_cached:
                    self._futures.popitem(last=False)
            else:
                self._futures.move_to_end(key)
            return future

    def _compile(self, kind: str, text: str) -> xgr.CompiledGrammar:
        try:
            if kind == "json":
                # Compact separators: free whitespace lets a model (a random one surely) pad forever.
                grammar = str(xgr.Grammar.from_json_schema(text, any_whitespace=False))
                if _LOOSE_STRING_CHAR not in grammar:
                    return self._compiler.compile_json_schema(text, any_whitespace=False)
                return self._compiler.compile_grammar(_strict_json_strings(grammar), root_rule_name="root")
            if kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return self._compiler.compile_regex(text)
            if kind == "choice":
                return self._compiler.compile_grammar(choice_grammar(json.loads(text)))
            if kind == "grammar":
                return self._compiler.compile_grammar(text, root_rule_name="root")
        except Exception as e:  # xgrammar raises RuntimeError/ValueError/its own types: all mean "bad input"
            reason = _LOG_PREFIX.sub("", str(e).strip()) or type(e).__name__
            raise StructuredOutputError(f"structured_outputs.{kind} cannot be compiled by {LIBRARY}: {reason}") from None
        raise StructuredOutputError(f"unknown structured_outputs kind {kind!r}")

    def new_matcher(self, compiled: xgr.CompiledGrammar) -> Matcher:
        return Matcher(compiled, self.stop_token_ids, self.vocab_size)

    def accept_tokens(self, matchers: list[Matcher], tokens: list[int]) -> list[bool]:
        """Matcher i takes tokens[i]: accept_token for a whole step in one call into xgrammar."""
        ok = [not m.is_terminated() and 0 <= t < self.vocab_size for m, t in zip(matchers, tokens)]
        live = [i for i, good in enumerate(ok) if good]
        if live:
            taken = xgr.BatchGrammarMatcher.batch_accept_token([matchers[i]._matcher for i in live],
                                                                [int(tokens[i]) for i in live])
            for i, accepted in zip(live, taken):
                ok[i] = bool(accepted)
        return ok

    def fill_bitmasks(self, matchers: list[Matcher]) -> torch.Tensor:
        """One step's masks, row i for matchers[i], filled by xgrammar's thread pool (each row depends on
        its own matcher only, so threads change nothing in the result)."""
        bitmask = self.allocate_bitmask(len(matchers))
        live = []
        for i, m in enumerate(matchers):
            if m.is_terminated():
                m.fill_bitmask(bitmask, i)
            else:
                live.append(i)
        if len(live) == 1:
            matchers[live[0]].fill_bitmask(bitmask, live[0])
        elif live:
            if self._batch is None:
                self._batch = xgr.BatchGrammarMatcher(max_threads=min(8, os.cpu_count() or 1))
            self._batch.batch_fill_next_token_bitmask([matchers[i]._matcher for i in live], bitmask, live)
        return bitmask

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """A CPU int32 bitmask [rows, ceil(vocab_size/32)], all tokens allowed."""
        return torch.full((rows, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
