"""Structured output: the engine's grammar masks (tprun.engine.structured_outputs) and the worker's mask
application (tprun.worker.bitmask), on the demo tokenizer. Outputs are checked with references that are not
ours: jsonschema, Python's re, plain membership, and a recursive-descent parser for the EBNF grammar."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch

from tprun.config import StructuredOutputsParams
from tprun.demo_model import DEMO_VOCAB_SIZE, train_tokenizer
from tprun.engine.structured_outputs import StructuredOutputError, StructuredOutputManager
from tprun.worker.bitmask import apply_token_bitmask

# The model's vocabulary is wider than the tokenizer's (TP padding): the extra ids must never be allowed.
MODEL_VOCAB = DEMO_VOCAB_SIZE + 13
WALKS = 60
MAX_STEPS = 600

SCHEMAS = {
    "flat_required": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                      "required": ["name", "age"]},
    "nested_enum_array": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {
            "name": {"type": "string"},
            "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"]}},
                   "required": ["name", "address"]},
        "status": {"enum": ["active", "inactive", "banned"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["person", "status", "tags"]},
    "patterns": {"type": "object", "properties": {"date": {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"},
                                                  "code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}},
                 "required": ["date", "code"]},
    "array_of_objects": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"x": {"type": "number"}, "ok": {"type": "boolean"},
                                         "n": {"type": ["integer", "null"]}},
        "required": ["x", "ok"]}},
}
REGEX = r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)|\d{3}-\d{3}-\d{4}"
CHOICES = ["positive", "negative", 'it is "mixed"', "naïve\\", "two\nlines\tand a tab"]
ARITH = '''root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [0-9]+'''


def parse_arith(s: str) -> None:
    """Raise ValueError unless s is in ARITH's language."""
    pos = 0

    def expect_factor() -> None:
        nonlocal pos
        if s[pos:pos + 1] == "(":
            pos += 1
            expect_expr()
            if s[pos:pos + 1] != ")":
                raise ValueError(f"missing ')' at {pos} in {s!r}")
            pos += 1
            return
        start = pos
        while pos < len(s) and s[pos] in "0123456789":
            pos += 1
        if pos == start:
            raise ValueError(f"expected a number at {pos} in {s!r}")

    def expect_chain(operand, ops: str) -> None:
        nonlocal pos
        operand()
        while s[pos:pos + 1] and s[pos] in ops:
            pos += 1
            operand()

    def expect_expr() -> None:
        expect_chain(lambda: expect_chain(expect_factor, "*/"), "+-")

    expect_expr()
    if pos != len(s):
        raise ValueError(f"trailing text at {pos} in {s!r}")


def check_json(schema):
    return lambda text: jsonschema.validate(json.loads(text), schema)


def check_json_object(text: str) -> None:
    assert isinstance(json.loads(text), dict), text


def check_regex(text: str) -> None:
    assert re.fullmatch(REGEX, text), text


def check_choice(text: str) -> None:
    assert text in CHOICES, text


CASES = {**{f"json-{name}": (StructuredOutputsParams(json=schema), check_json(schema)) for name, schema in SCHEMAS.items()},
         "regex": (StructuredOutputsParams(regex=REGEX), check_regex),
         "choice": (StructuredOutputsParams(choice=CHOICES), check_choice),
         "grammar": (StructuredOutputsParams(grammar=ARITH), parse_arith),
         "json_object": (StructuredOutputsParams(json_object=True), check_json_object)}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def manager(tokenizer):
    m = StructuredOutputManager(tokenizer, MODEL_VOCAB, eos_token_ids=[tokenizer.eos_token_id])
    yield m
    m.shutdown()


def allowed(bitmask: torch.Tensor, row: int) -> list[int]:
    bits = (bitmask[row].unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:MODEL_VOCAB].nonzero().flatten().tolist()


def random_walk(manager, compiled, eos: int, closers: set[int], rng: random.Random) -> tuple[list[int], list[torch.Tensor]]:
    """Sample allowed tokens until EOS; half the time prefer tokens that close a string/object/array so that
    walks end in tens of steps (uniform choice rarely picks the one closing quote among hundreds)."""
    matcher = manager.new_matcher(compiled)
    bitmask = manager.allocate_bitmask(2)
    tokens, masks = [], []
    for _ in range(MAX_STEPS):
        matcher.fill_bitmask(bitmask, 1)
        masks.append(bitmask[1].clone())
        ok = allowed(bitmask, 1)
        assert ok, f"empty mask after {tokens}"
        assert max(ok) < DEMO_VOCAB_SIZE, "an id past the tokenizer's vocabulary was allowed"
        if eos in ok and rng.random() < 0.5:
            token = eos
        else:
            close = [t for t in ok if t in closers]
            token = rng.choice(close) if close and rng.random() < 0.5 else rng.choice(ok)
        disallowed = rng.choice(sorted(set(range(DEMO_VOCAB_SIZE)) - set(ok)))
        assert not matcher.accept_token(disallowed), "a token outside the mask was accepted"
        assert matcher.accept_token(token), f"a token inside the mask was rejected: {token}"
        tokens.append(token)
        if token == eos:
            assert matcher.is_terminated()
            return tokens, masks
        assert not matcher.is_terminated()
    raise AssertionError(f"no EOS after {MAX_STEPS} steps")


@pytest.mark.parametrize("case", list(CASES))
def test_random_walks_always_produce_valid_output(manager, tokenizer, case):
    params, check = CASES[case]
    compiled = manager.submit(params).result(timeout=60)
    eos = tokenizer.eos_token_id
    closers = {i for t, i in tokenizer.get_vocab().items() if any(c in t for c in '"}]),@.-')}
    rng = random.Random(case)
    for _ in range(WALKS):
        tokens, _ = random_walk(manager, compiled, eos, closers, rng)
        check(tokenizer.decode(tokens[:-1]))


def test_complete_grammar_allows_only_the_models_eos_tokens(tokenizer):
    eos_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|system|>")]  # e.g. generation_config's list
    manager = StructuredOutputManager(tokenizer, MODEL_VOCAB, eos_token_ids=eos_ids)
    matcher = manager.new_matcher(manager.submit(StructuredOutputsParams(choice=["yes"])).result(timeout=60))
    for token in tokenizer.encode("yes", add_special_tokens=False):
        assert matcher.accept_token(token)
    bitmask = manager.allocate_bitmask(1)
    matcher.fill_bitmask(bitmask, 0)
    assert allowed(bitmask, 0) == sorted(eos_ids)
    assert matcher.accept_token(eos_ids[1]) and matcher.is_terminated()
    manager.shutdown()


@pytest.mark.parametrize("params, names", [
    (StructuredOutputsParams(regex="(?=a)b"), ["regex", "Lookahead"]),
    (StructuredOutputsParams(json={"type": "nonsense"}), ["json", "nonsense"]),
    (StructuredOutputsParams(json='{"type": "object",'), ["json", "not valid JSON"]),
    (StructuredOutputsParams(grammar='root ::= missing_rule'), ["grammar", "missing_rule"]),
])
def test_uncompilable_request_is_a_clear_error(manager, params, names):
    with pytest.raises(StructuredOutputError) as err:
        manager.submit(params).result(timeout=60)
    for name in names:
        assert name in str(err.value)


def test_each_distinct_request_compiles_once(tokenizer):
    manager = StructuredOutputManager(tokenizer, MODEL_VOCAB, eos_token_ids=[tokenizer.eos_token_id])
    schema = SCHEMAS["flat_required"]
    same = [StructuredOutputsParams(json=schema), StructuredOutputsParams(json=json.dumps(schema, indent=2)),
            StructuredOutputsParams(json=json.loads(json.dumps(schema)))]
    futures = [manager.submit(p) for p in same]
    assert manager.compile_count == 1 and all(f is futures[0] for f in futures)
    # Property order decides the field order of the output, so it is a different grammar.
    reordered = {**schema, "properties": dict(reversed(list(schema["properties"].items())))}
    manager.submit(StructuredOutputsParams(json=reordered))
    manager.submit(StructuredOutputsParams(choice=["a", "b"]))
    manager.submit(StructuredOutputsParams(choice=["a", "b"]))
    assert manager.compile_count == 3
    manager.shutdown()


def test_two_managers_make_identical_masks(manager, tokenizer):
    """What every rank relies on: the same request and tokens give bit-identical masks in separate managers."""
    other = StructuredOutputManager(tokenizer, MODEL_VOCAB, eos_token_ids=[tokenizer.eos_token_id])
    params = CASES["json-nested_enum_array"][0]
    closers = {i for t, i in tokenizer.get_vocab().items() if '"' in t or "}" in t}
    tokens, masks = random_walk(manager, manager.submit(params).result(timeout=60), tokenizer.eos_token_id,
                                closers, random.Random(7))
    replay = other.new_matcher(other.submit(params).result(timeout=60))
    bitmask = other.allocate_bitmask(1)
    for token, mask in zip(tokens, masks):
        replay.fill_bitmask(bitmask, 0)
        assert torch.equal(bitmask[0], mask)
        assert replay.accept_token(token)
    other.shutdown()


def naive_apply(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    out = logits.clone()
    for mask_row, row in enumerate(rows):
        for token in range(logits.shape[1]):
            word = token // 32
            ok = word < bitmask.shape[1] and (int(bitmask[mask_row, word]) >> (token % 32)) & 1
            if not ok:
                out[row, token] = float("-inf")
    return out


@pytest.mark.parametrize("vocab", [64, 331, 344, 400])  # bitmask exactly as wide, wider, and narrower than logits
@pytest.mark.parametrize("with_rows", [False, True])
def test_apply_token_bitmask_matches_naive_reference(vocab, with_rows):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=gen, dtype=torch.float64)
    rows = [3, 0, 4] if with_rows else list(range(5))
    words = (344 + 31) // 32 if vocab != 64 else 2
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), words), generator=gen, dtype=torch.int64).to(torch.int32)
    bitmask[0, 0] = -1  # bit 31 set: the sign bit
    expected = naive_apply(logits, bitmask, rows)
    original = logits.clone()
    apply_token_bitmask(logits, bitmask, torch.tensor(rows) if with_rows else None)
    assert torch.equal(logits, expected)
    if torch.cuda.is_available():
        cuda_logits = original.cuda()
        apply_token_bitmask(cuda_logits, bitmask, torch.tensor(rows) if with_rows else None)
        assert torch.equal(cuda_logits.cpu(), expected)
