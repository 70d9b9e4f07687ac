"""PEFT's per-module lookups, matched in linear time; shared by validation, runtimes and diff.

An artifact's config may hold regular expressions that are matched against module names:
`rank_pattern` and `alpha_pattern` keys (a module takes the value of the first key that
matches its name: PEFT's `get_pattern_key`, `re.match(rf"(.*\\.)?({key})$", name)`, i.e. the
key matches the whole name or a dotted suffix of it) and IA3's `feedforward_modules` given
as a string (`re.fullmatch`). Python's `re` backtracks, so a key such as `(.|.)*Z` takes
time exponential in the name's length; such keys come from anyone who can publish.

Here a pattern is parsed by Python's own regex parser (so its syntax and meaning are
`re`'s) and run as a Thompson NFA (Thompson 1968; Cox, "Regular Expression Matching Can Be
Simple And Fast", 2007): one pass over the name, keeping the set of live states, so a
match costs O(len(name) * states) whatever the pattern. Patterns are at most
`MAX_PATTERN_LENGTH` characters and `MAX_STATES` states (validation also caps the states of
one field's keys together at `MAX_TOTAL_STATES`, so matching one module name against a
whole rank_pattern costs at most len(name) * MAX_TOTAL_STATES steps); the constructs that have no
linear-time meaning (backreferences, lookaround, atomic and possessive groups) and flags
are refused, as is a pattern `re` cannot parse: `PatternError`, which validation turns
into `InvalidArtifact("config-pattern")` naming the field. Torch-free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

try:  # Python >= 3.11
    from re import _constants as _c
    from re import _parser as _p
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

MAX_PATTERN_LENGTH = 512
MAX_STATES = 4096  # one pattern
MAX_TOTAL_STATES = 8192  # all the regex keys of one config field together

# A name made only of these characters is a plain module name; its "." still means any
# character, as in PEFT, and is matched without building an NFA.
_PLAIN = re.compile(r"[A-Za-z0-9_\-.]*")


class PatternError(ValueError):
    """A pattern that cannot be matched safely: it does not parse, or uses a construct
    (backreference, lookaround, flags) with no linear-time match, or is too large."""


def _word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: dict[Any, Callable[[str], bool]] = {
    _c.CATEGORY_DIGIT: str.isdecimal,
    _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    _c.CATEGORY_SPACE: str.isspace,
    _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    _c.CATEGORY_WORD: _word,
    _c.CATEGORY_NOT_WORD: lambda ch: not _word(ch),
}


class _NFA:
    """States are indices; `kind[i]` is "char" (test `pred[i]`, go to `out[i]`), "split" (go
    to `out[i]` and `out2[i]`), "assert" (zero-width test `pred[i]` at a position), "match"."""

    def __init__(self) -> None:
        self.kind: list[str] = []
        self.pred: list[Any] = []
        self.out: list[int] = []
        self.out2: list[int] = []

    def add(self, kind: str, pred: Any = None) -> int:
        if len(self.kind) >= MAX_STATES:
            raise PatternError(f"the pattern needs more than {MAX_STATES} states")
        self.kind.append(kind)
        self.pred.append(pred)
        self.out.append(-1)
        self.out2.append(-1)
        return len(self.kind) - 1


def _charset(items: list[tuple[Any, Any]]) -> Callable[[str], bool]:
    negate = False
    chars: set[str] = set()
    ranges: list[tuple[int, int]] = []
    cats: list[Callable[[str], bool]] = []
    for op, av in items:
        if op is _c.NEGATE:
            negate = True
        elif op is _c.LITERAL:
            chars.add(chr(av))
        elif op is _c.RANGE:
            ranges.append(av)
        elif op is _c.CATEGORY and av in _CATEGORIES:
            cats.append(_CATEGORIES[av])
        else:
            raise PatternError(f"character class item {op} is not supported")

    def test(ch: str) -> bool:
        hit = ch in chars or any(lo <= ord(ch) <= hi for lo, hi in ranges) or any(f(ch) for f in cats)
        return hit != negate

    return test


def _assertion(at: Any) -> Callable[[str, int], bool]:
    if at in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING):
        return lambda s, i: i == 0
    if at is _c.AT_END:  # `$`: the end, or just before a final newline
        return lambda s, i: i == len(s) or (i == len(s) - 1 and s[-1] == "\n")
    if at is _c.AT_END_STRING:
        return lambda s, i: i == len(s)

    def boundary(s: str, i: int) -> bool:
        return (i > 0 and _word(s[i - 1])) != (i < len(s) and _word(s[i]))

    if at is _c.AT_BOUNDARY:
        return boundary
    if at is _c.AT_NON_BOUNDARY:
        return lambda s, i: not boundary(s, i)
    raise PatternError(f"anchor {at} is not supported")


def _build(nfa: _NFA, items: Any, nxt: int) -> int:
    """States for the sequence `items` that continue to state `nxt`; returns its entry."""
    for op, av in reversed(list(items)):
        nxt = _build_one(nfa, op, av, nxt)
    return nxt


def _build_one(nfa: _NFA, op: Any, av: Any, nxt: int) -> int:
    if op is _c.LITERAL or op is _c.NOT_LITERAL or op is _c.ANY or op is _c.IN:
        if op is _c.LITERAL:
            pred: Callable[[str], bool] = chr(av).__eq__
        elif op is _c.NOT_LITERAL:
            pred = chr(av).__ne__
        elif op is _c.ANY:
            pred = "\n".__ne__
        else:
            pred = _charset(av)
        s = nfa.add("char", pred)
        nfa.out[s] = nxt
        return s
    if op is _c.SUBPATTERN:
        _group, add_flags, del_flags, sub = av
        if add_flags or del_flags:
            raise PatternError("inline flags are not supported")
        return _build(nfa, sub, nxt)
    if op is _c.BRANCH:
        entries = [_build(nfa, alt, nxt) for alt in av[1]]
        entry = entries[-1]
        for e in reversed(entries[:-1]):
            s = nfa.add("split")
            nfa.out[s], nfa.out2[s] = e, entry
            entry = s
        return entry
    if op is _c.MAX_REPEAT or op is _c.MIN_REPEAT:  # lazy or greedy: the same language
        lo, hi, sub = av
        if lo > MAX_STATES or (hi != _c.MAXREPEAT and hi - lo > MAX_STATES):
            raise PatternError(f"a repeat count above {MAX_STATES}")
        if hi == _c.MAXREPEAT:  # sub{lo} then sub*
            loop = nfa.add("split")
            nfa.out[loop] = _build(nfa, sub, loop)
            nfa.out2[loop] = nxt
            entry = loop
        else:  # sub{lo} then (sub (sub (...)?)?)? with hi - lo optional copies
            entry = nxt
            for _ in range(hi - lo):
                s = nfa.add("split")
                nfa.out[s], nfa.out2[s] = _build(nfa, sub, entry), nxt
                entry = s
        for _ in range(lo):
            entry = _build(nfa, sub, entry)
        return entry
    if op is _c.AT:
        s = nfa.add("assert", _assertion(av))
        nfa.out[s] = nxt
        return s
    raise PatternError(f"{str(op).lower()} has no linear-time match")


@lru_cache(maxsize=1024)
def _compile(regex: str) -> tuple[_NFA, int]:
    try:
        parsed = _p.parse(regex)
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        raise PatternError(f"not a valid regular expression ({e})") from None
    if parsed.state.flags & ~_c.SRE_FLAG_UNICODE:
        raise PatternError("regex flags are not supported")
    nfa = _NFA()
    final = nfa.add("match")
    try:
        return nfa, _build(nfa, parsed, final)
    except RecursionError:
        raise PatternError("the pattern nests too deeply") from None


def check_pattern(pattern: Any) -> None:
    """Raise `PatternError` unless `pattern` is a string this module can match safely."""
    if not isinstance(pattern, str):
        raise PatternError(f"a pattern must be a string, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(f"the pattern is {len(pattern)} characters (limit {MAX_PATTERN_LENGTH})")
    if not _PLAIN.fullmatch(pattern):
        _compile(pattern)


def pattern_size(pattern: str) -> int:
    """The NFA states a checked pattern needs (0 for a plain name, matched without one)."""
    check_pattern(pattern)
    return 0 if _PLAIN.fullmatch(pattern) else len(_compile(pattern)[0].kind)


def _run(nfa: _NFA, start: int, s: str) -> bool:
    kind, pred, out, out2 = nfa.kind, nfa.pred, nfa.out, nfa.out2

    def closure(states: list[int], i: int) -> list[int]:
        seen: set[int] = set()
        stack = list(states)
        live = []
        while stack:
            st = stack.pop()
            if st in seen:
                continue
            seen.add(st)
            k = kind[st]
            if k == "split":
                stack.append(out2[st])
                stack.append(out[st])
            elif k == "assert":
                if pred[st](s, i):
                    stack.append(out[st])
            else:
                live.append(st)
        return live

    current = closure([start], 0)
    for i, ch in enumerate(s):
        step = [out[st] for st in current if kind[st] == "char" and pred[st](ch)]
        if not step:
            return False
        current = closure(step, i + 1)
    return any(kind[st] == "match" for st in current)


def fullmatch(pattern: str, name: str) -> bool:
    """`re.fullmatch(pattern, name) is not None`, in linear time (`PatternError` if the
    pattern cannot be matched safely)."""
    check_pattern(pattern)
    nfa, start = _compile(pattern)
    return _run(nfa, start, name)


def _plain_suffix_match(key: str, name: str) -> bool:
    # `key` has a fixed length; "." matches any character but a newline.
    n = len(key)
    if len(name) < n or (len(name) > n and name[-n - 1] != "."):
        return False
    tail = name[len(name) - n :]
    return all(k == c or (k == "." and c != "\n") for k, c in zip(key, tail, strict=True))


@lru_cache(maxsize=65536)
def key_matches(key: str, name: str) -> bool:
    """PEFT's `get_pattern_key` test: re.match(rf"(.*\\.)?({key})$", name), in linear time."""
    check_pattern(key)
    if _PLAIN.fullmatch(key) and "\n" not in name:
        # A dotted suffix at any position ending the name ("$" also before a final newline,
        # which a module name never has).
        return _plain_suffix_match(key, name)
    nfa, start = _compile(rf"(?:.*\.)?(?:{key})$")
    return _run(nfa, start, name)


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup (`get_pattern_key`): the value of the first
    key k with re.match(rf"(.*\\.)?({k})$", module), else `default`."""
    for key, value in (patterns or {}).items():
        if key_matches(key, module):
            return value
    return default


def lora_scaling(config: dict[str, Any], module: str, r: int) -> float:
    """PEFT's scaling s of one LoRA module: alpha / r, or alpha / sqrt(r) with rsLoRA
    (Kalajdzievski 2023), alpha taken per module from alpha_pattern."""
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
