"""Stop strings, as vLLM checks them: on the text decoded so far, after each new token.

The text grows incrementally (vLLM's prefix/read offsets): each step decodes only a short window of
tokens, so a long output costs O(window) per token instead of re-decoding everything. A window whose text
ends in U+FFFD is an incomplete UTF-8 sequence and waits for the next token.
"""

from __future__ import annotations

# Prompt tokens decoded before the first output token, so that its leading space is kept or dropped as a
# full decode would (vLLM uses the same few tokens of context).
_CONTEXT_TOKENS = 5


class StopStringChecker:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...], include_in_output: bool,
                 skip_special_tokens: bool, min_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.include = include_in_output
        self.skip_special = skip_special_tokens
        self.min_tokens = min_tokens
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""

    def append(self, token_id: int, num_output_tokens: int) -> str | None:
        """Feed one generated token; returns the stop string it completed (text truncated), else None."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return None
        new = after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += new
        if num_output_tokens <= self.min_tokens:  # vLLM: no stop string before min_tokens are out
            return None
        for s in self.stop:
            # Only an occurrence that ends inside the new text is new.
            at = self.text.find(s, max(0, len(self.text) - len(new) - len(s) + 1))
            if at >= 0:
                self.text = self.text[: at + len(s) if self.include else at]
                return s
        return None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special,
                                     clean_up_tokenization_spaces=False) if ids else ""
