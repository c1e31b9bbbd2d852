"""Pattern keys of peft's ``rank_pattern`` / ``alpha_pattern``, matched as peft does, in bounded time.

:func:`compile_pattern_key` turns one key into a predicate over module paths.
A fixed key (peft's and :meth:`LoRA.save <kmerge_fast.LoRA.save>`'s) is a
suffix comparison; any other key is a regex, run by :class:`_RegexKey` as an
automaton (never by backtracking) under the bounds below, so that no
``adapter_config.json`` can hang the loader. Torch-free.
"""

from __future__ import annotations

import re

# Python's own regex parser, for pattern keys (compile_pattern_key).
try:  # Python >= 3.11
    from re import _constants as _sre_c, _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_c
    import sre_parse as _sre_parse

#: Longest ``rank_pattern`` / ``alpha_pattern`` key accepted (peft's keys are module paths).
MAX_PATTERN_KEY_CHARS = 1000
#: Most automaton instructions a regex pattern key may compile to (counted repeats are unrolled).
MAX_PATTERN_PROGRAM = 2000
#: Most automaton steps one regex pattern key may take over one load (about a second of Python).
MAX_PATTERN_WORK = 1_000_000


_REGEX_META = frozenset(".^$*+?{}[]\\|()")


def compile_pattern_key(key: str):
    """A predicate ``matches(module_path) -> bool`` for one rank_pattern / alpha_pattern key.

    It answers exactly what peft (0.21, ``get_pattern_key``) computes,
    ``re.match(rf"(.*\\.)?({key})$", module_path) is not None``, but in bounded
    time whatever the key, so that no config can hang the loader (Python's
    backtracking ``re`` takes exponential time on keys such as ``(a+)+``):

    * A *fixed* key, made of plain characters, ``\\``-escaped punctuation (as
      ``re.escape`` writes it) and ``.`` (any character but a newline, as in a
      regex), has one length L; it is compared with the last L characters of
      the path, which must be the whole path or follow a ``.``. O(L) per path.
      peft's and :meth:`LoRA.save`'s keys are all of this kind.
    * Any other key is a regex. Python's own parser reads it; it then runs as
      an automaton (a DFA built lazily from the Thompson NFA, as RE2 does),
      never by backtracking. Supported: literals, classes and escapes such as
      ``\\d``, ``.``, groups, ``|``, greedy and lazy repeats, ``^``, ``$``,
      ``\\A``, ``\\Z``. Refused with a ValueError: backreferences, lookarounds,
      conditionals, atomic groups, possessive repeats, inline flags, word
      boundaries, keys over :data:`MAX_PATTERN_KEY_CHARS` characters or
      :data:`MAX_PATTERN_PROGRAM` instructions, and (when matched) a key that
      spends more than :data:`MAX_PATTERN_WORK` automaton steps in one load.

    Raises:
        ValueError: the key is invalid or refused; the message says why.
    """
    if not isinstance(key, str):
        raise ValueError(f"expected a string, got {type(key).__name__}")
    if len(key) > MAX_PATTERN_KEY_CHARS:
        raise ValueError(f"longer than {MAX_PATTERN_KEY_CHARS} characters")
    tokens = _fixed_tokens(key)
    return _fixed_matcher(tokens) if tokens is not None else _RegexKey(key).matches


def _fixed_tokens(key: str) -> list[str | None] | None:
    """The characters of a fixed key, None for a ``.`` wildcard; None when ``key`` is a real regex."""
    tokens: list[str | None] = []
    i = 0
    while i < len(key):
        c = key[i]
        if c == "\\":
            # "\" + an ASCII letter or digit is a class, an anchor or a group reference.
            if i + 1 == len(key) or (key[i + 1].isascii() and key[i + 1].isalnum()):
                return None
            tokens.append(key[i + 1])
            i += 2
            continue
        if c == ".":
            tokens.append(None)
        elif c in _REGEX_META:
            return None
        else:
            tokens.append(c)
        i += 1
    return tokens


def _fixed_matcher(tokens: list[str | None]):
    n_tokens = len(tokens)
    literal = None if None in tokens else "".join(tokens)

    def whole(path: str) -> bool:
        """``(.*\\.)?(key)`` matches all of ``path``."""
        cut = len(path) - n_tokens
        if cut < 0 or (cut > 0 and (path[cut - 1] != "." or "\n" in path[:cut])):
            return False
        tail = path[cut:]
        if literal is not None:
            return tail == literal
        return all(ch != "\n" if t is None else ch == t for t, ch in zip(tokens, tail))

    # "$" also matches just before a final newline.
    return lambda path: whole(path) or (path.endswith("\n") and whole(path[:-1]))


_CATEGORIES = {
    _sre_c.CATEGORY_DIGIT: re.compile(r"\d"), _sre_c.CATEGORY_NOT_DIGIT: re.compile(r"\D"),
    _sre_c.CATEGORY_SPACE: re.compile(r"\s"), _sre_c.CATEGORY_NOT_SPACE: re.compile(r"\S"),
    _sre_c.CATEGORY_WORD: re.compile(r"\w"), _sre_c.CATEGORY_NOT_WORD: re.compile(r"\W"),
}
_ASSERTIONS = (_sre_c.AT_BEGINNING, _sre_c.AT_BEGINNING_STRING, _sre_c.AT_END, _sre_c.AT_END_STRING)


class _RegexKey:
    """peft's ``(.*\\.)?(key)$`` as a Thompson NFA run as a lazily built DFA (see :func:`compile_pattern_key`).

    Instructions: ``("char", predicate)`` consumes one character,
    ``("split", x, y)`` forks, ``("jmp", x)``, ``("assert", at_code)`` is a
    zero-width anchor, ``("match",)`` accepts. A DFA state is the set of NFA
    instructions alive before a character; transitions are cached, so each
    (state, character) pair costs NFA work once, and the total is capped by
    :data:`MAX_PATTERN_WORK`.
    """

    def __init__(self, key: str):
        try:
            parsed = _sre_parse.parse(rf"(.*\.)?({key})$")
        except re.error as e:
            raise ValueError(f"invalid regular expression: {e}") from None
        except RecursionError:
            raise ValueError("regular expression nested too deeply") from None
        if parsed.state.flags & ~_sre_c.SRE_FLAG_UNICODE:
            raise ValueError("inline flags such as (?i) are not supported")
        self.prog: list[tuple] = []
        self._seq(parsed)
        self._emit("match")
        self.work = 0
        self._closures: dict = {}
        self._steps: dict = {}

    # compilation
    def _emit(self, *instruction) -> int:
        if len(self.prog) >= MAX_PATTERN_PROGRAM:
            raise ValueError(f"regular expression too large (over {MAX_PATTERN_PROGRAM} automaton instructions)")
        self.prog.append(list(instruction))
        return len(self.prog) - 1

    def _seq(self, items) -> None:
        for op, av in items:
            self._node(op, av)

    def _node(self, op, av) -> None:
        c = _sre_c
        if op is c.LITERAL:
            ch = chr(av)
            self._emit("char", lambda x: x == ch)
        elif op is c.NOT_LITERAL:
            ch = chr(av)
            self._emit("char", lambda x: x != ch)
        elif op is c.ANY:
            self._emit("char", lambda x: x != "\n")
        elif op is c.IN:
            self._emit("char", self._class(av))
        elif op is c.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise ValueError("inline flags such as (?i:...) are not supported")
            self._seq(sub)
        elif op is c.BRANCH:
            jumps = []
            alternatives = av[1]
            for alt in alternatives[:-1]:
                split = self._emit("split", len(self.prog) + 1, None)
                self._seq(alt)
                jumps.append(self._emit("jmp", None))
                self.prog[split][2] = len(self.prog)
            self._seq(alternatives[-1])
            for j in jumps:
                self.prog[j][1] = len(self.prog)
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT):  # greedy or lazy: the same set of matches
            lo, hi, item = av
            start = len(self.prog)
            if lo:
                self._seq(item)
                if len(self.prog) == start:  # an empty item: repeating it adds nothing
                    return
                for _ in range(lo - 1):
                    self._seq(item)
            if hi == c.MAXREPEAT:
                loop = self._emit("split", len(self.prog) + 1, None)
                self._seq(item)
                self._emit("jmp", loop)
                self.prog[loop][2] = len(self.prog)
            else:
                splits = []
                for _ in range(hi - lo):
                    splits.append(self._emit("split", len(self.prog) + 1, None))
                    self._seq(item)
                for s in splits:
                    self.prog[s][2] = len(self.prog)
        elif op is c.AT and av in _ASSERTIONS:
            self._emit("assert", av)
        else:
            name = {c.GROUPREF: "backreferences", c.ASSERT: "lookarounds", c.ASSERT_NOT: "lookarounds",
                    c.GROUPREF_EXISTS: "conditionals", c.AT: "this anchor (only ^, $, \\A, \\Z are)"}.get(op, str(op))
            raise ValueError(f"regular expression uses {name}, which pattern keys do not support")

    @staticmethod
    def _class(items):
        tests = []
        negate = False
        for op, av in items:
            if op is _sre_c.NEGATE:
                negate = True
            elif op is _sre_c.LITERAL:
                tests.append(lambda x, ch=chr(av): x == ch)
            elif op is _sre_c.RANGE:
                tests.append(lambda x, lo=av[0], hi=av[1]: lo <= ord(x) <= hi)
            elif op is _sre_c.CATEGORY and av in _CATEGORIES:
                tests.append(lambda x, rx=_CATEGORIES[av]: rx.match(x) is not None)
            else:
                raise ValueError(f"character class uses {op}, which pattern keys do not support")
        return lambda x: any(t(x) for t in tests) != negate

    # matching
    def _spend(self, steps: int) -> None:
        self.work += steps
        if self.work > MAX_PATTERN_WORK:
            raise ValueError(f"regular expression too costly to match (over {MAX_PATTERN_WORK} automaton steps)")

    def _closure(self, state: frozenset, anchors: tuple) -> tuple[tuple, bool]:
        """(the "char" instructions reachable from ``state`` without consuming, whether "match" is)."""
        cached = self._closures.get((state, anchors))
        if cached is not None:
            return cached
        at_start, at_dollar, at_string_end = anchors
        holds = {_sre_c.AT_BEGINNING: at_start, _sre_c.AT_BEGINNING_STRING: at_start,
                 _sre_c.AT_END: at_dollar, _sre_c.AT_END_STRING: at_string_end}
        seen = set()
        stack = list(state)
        chars = []
        matched = False
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            ins = self.prog[pc]
            kind = ins[0]
            if kind == "char":
                chars.append(pc)
            elif kind == "split":
                stack += (ins[1], ins[2])
            elif kind == "jmp":
                stack.append(ins[1])
            elif kind == "assert":
                if holds[ins[1]]:
                    stack.append(pc + 1)
            else:
                matched = True
        self._spend(len(seen))
        result = (tuple(sorted(chars)), matched)
        self._closures[(state, anchors)] = result
        return result

    def _step(self, chars: tuple, x: str) -> frozenset:
        nxt = self._steps.get((chars, x))
        if nxt is None:
            self._spend(len(chars) + 1)
            nxt = frozenset(pc + 1 for pc in chars if self.prog[pc][1](x))
            self._steps[(chars, x)] = nxt
        return nxt

    def matches(self, path: str) -> bool:
        n = len(path)
        state = frozenset((0,))
        for i in range(n + 1):
            anchors = (i == 0, i == n or (i == n - 1 and path[-1] == "\n"), i == n)
            chars, matched = self._closure(state, anchors)
            if matched:  # re.match: a match of any prefix of the path counts
                return True
            if i == n or not chars:
                return False
            state = self._step(chars, path[i])
        return False
