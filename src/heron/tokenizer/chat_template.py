"""Chat templates: Jinja rendered as `transformers` renders it, in an immutable sandbox
(`jinja2.sandbox.ImmutableSandboxedEnvironment`), so a template can only format its inputs, never
reach Python objects' internals or change them; and within limits, so a template (foreign code,
shipped in a model folder) can neither run on nor fill memory.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import cache, lru_cache, wraps
from typing import Any

from jinja2 import BaseLoader, Environment, Template, TemplateNotFound, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range


class ChatTemplateError(ValueError):
    """A chat template that does not parse, or that refused the messages."""


# ----- limits on one render ------------------------------------------------
# Jinja's sandbox keeps a template from Python's internals, not from running on or filling memory
# (two nested range(100000) loops; 'a' * 10**10). Each render has a budget of steps and of characters
# made; one value, the output included, is capped; what operators, str methods and filters would make
# is foreseen where it can be and checked after; a deadline backs them for work no count sees (`'x' in
# text` on a long text, in every turn of a long loop).
TEMPLATE_STEPS = 1_000_000  # loop iterations, calls and range items in one render
TEMPLATE_LENGTH = 2**24  # characters (or items) in one value, the output included: some 4M tokens
TEMPLATE_MADE = 2**27  # characters (or items) of all the values one render makes
TEMPLATE_SECONDS = 10.0
_NUMBER_BITS = 4096  # the biggest number * and ** may make (1,233 digits; no template needs more)
_SIZED = (str, bytes, list, tuple, dict, set, frozenset)
_FREE_LENGTH = 1024  # values this short are not charged to TEMPLATE_MADE (see _checked)


class TemplateLimit(ChatTemplateError):
    """A render that ran past a limit; apply_chat_template adds which template it was."""


class _Meter:
    """What one render has spent; every render starts a fresh one (MeteredTemplate)."""

    def __init__(self) -> None:
        self.steps = self.made = 0
        self.deadline = time.monotonic() + TEMPLATE_SECONDS

    def spend(self, steps: int = 0, made: int = 0) -> None:
        self.steps += steps
        self.made += made
        if self.steps > TEMPLATE_STEPS:
            raise TemplateLimit(f"ran past {TEMPLATE_STEPS:,} steps (loop iterations, calls and range items)")
        if self.made > TEMPLATE_MADE:
            raise TemplateLimit(f"made more than {TEMPLATE_MADE:,} characters")
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"ran past {TEMPLATE_SECONDS:g} seconds")


_METER: ContextVar[_Meter | None] = ContextVar("heron_chat_template_meter", default=None)


def _spend(steps: int = 0, made: int = 0) -> None:
    meter = _METER.get()
    if meter is not None:  # None while Jinja folds constants at compile time: no render to charge
        meter.spend(steps, made)


def _checked(value: Any) -> Any:
    """`value`, charged to the render, unless it is longer than one value may be. Short values go free,
    the most a render makes of them bounded by its steps: charging each would slow every `+` threefold."""
    if isinstance(value, _SIZED) and len(value) > _FREE_LENGTH:
        _refuse_size("a value", len(value))
        _spend(made=len(value))
    return value



def _refuse_size(what: str, size: int) -> None:
    if size > TEMPLATE_LENGTH:
        raise TemplateLimit(f"{what}: {_amount(size)} characters or items, past the {TEMPLATE_LENGTH:,} one value "
                             "may hold")


def _amount(n: int) -> str:
    return f"{n:,}" if n < 10**15 else f"some 2**{n.bit_length() - 1}"  # Python will not print a 5000-digit int


def _foresee_binop(op: str, left: Any, right: Any) -> None:
    """Refuse `left op right` before it runs where its result would be too big."""
    ints = type(left) is int and type(right) is int
    if op == "*" and ints:
        bits = left.bit_length() + right.bit_length()
    elif op == "**" and ints and right > 0:
        bits = left.bit_length() * right
    else:
        bits = 0
    if bits > _NUMBER_BITS:
        raise TemplateLimit(f"{op} would make a number of {_amount(bits)} bits (at most {_NUMBER_BITS:,})")
    if op == "*" and isinstance(left, int) != isinstance(right, int):  # 'a' * 10**10, [x] * n
        sequence, times = (right, left) if isinstance(left, int) else (left, right)
        if isinstance(sequence, str | list | tuple):
            _refuse_size("*", len(sequence) * times)
    if op == "%" and isinstance(left, str):  # '%999999999d' % 1
        values = right if isinstance(right, tuple) else list(right.values()) if isinstance(right, dict) else [right]
        _refuse_size("%", _format_size(left, values))


def _format_size(fmt: Any, values: Sequence[Any]) -> int:
    """A bound on what a format makes: each field as long as the longest value or the widest width,
    be it written in the format ('{:99999999}', '%99999999d') or given by a value ('%*d', '{:{}}').
    Widths are read only where a format writes them (a `{...:spec}`, a `%` conversion), never from the
    literal text around them ('Year 20000000: {}')."""
    if not isinstance(fmt, str):
        return 0
    specs = re.findall(r"\{[^{}:]*:([^{}]*)\}", fmt) + re.findall(r"%(?:\([^)]*\))?([-+ #0]*\d*(?:\.\d*)?)", fmt)
    widths = [int(digits[:10]) for spec in specs for digits in re.findall(r"\d+", spec)]
    width_values = "*" in fmt or re.search(r"\{[^{}]*\{", fmt) is not None
    sizes = [len(v) if isinstance(v, str | list | tuple | dict) else abs(v) if width_values and type(v) is int
             else 0 for v in values]
    return len(fmt) + (fmt.count("%") + fmt.count("{")) * max(widths + sizes, default=0)


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    found = s.count(old) if old else len(s) + 1
    return len(s) + min(found, count if type(count) is int and count >= 0 else found) * len(new)


def _join_size(separator: Any, items: Any) -> int:
    if not (isinstance(separator, str) and isinstance(items, list | tuple)):
        return 0
    return len(separator) * len(items) + sum(len(item) for item in items if isinstance(item, str))


def _repeat_size(s: Any, mark: str, width: Any) -> int:
    """`s` with `width` (a count, or a text) written at each `mark`: indent's lines, expandtabs' tabs."""
    if not isinstance(s, str):
        return 0
    return len(s) + (s.count(mark) + 1) * (width if type(width) is int else len(width) if isinstance(width, str) else 0)


# Filters and str methods that can multiply a text, and a bound on what they would make, checked before
# they run ("x\n" * 1000 | indent(10**7), s.replace("a", s), [s] * n | join). The arguments that are sizes
# (_SIZE_ARGUMENTS: a width, a count of items) are held to TEMPLATE_LENGTH, which bounds center, ljust,
# zfill, batch and the rest; any other number (a timestamp to format, a token count) goes as it is.
_FILTER_SIZES: dict[str, Callable[..., int]] = {
    "replace": lambda s, old, new, count=None: _replace_size(s, old, new, count),
    "join": lambda items, d="", attribute=None: _join_size(d, items),
    "indent": lambda s, width=4, first=False, blank=False: _repeat_size(s, "\n", width),
    "wordwrap": lambda s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True:
        _repeat_size(s, "", wrapstring),
    "format": lambda fmt, *args, **kwargs: _format_size(fmt, [*args, *kwargs.values()]),
}
_METHOD_SIZES: dict[str, Callable[..., int]] = {
    "replace": _replace_size,
    "join": _join_size,
    "expandtabs": lambda s, tabsize=8: _repeat_size(s, "\t", tabsize),
    "format": lambda fmt, *args, **kwargs: _format_size(fmt, [*args, *kwargs.values()]),
    "format_map": lambda fmt, mapping: _format_size(fmt, list(mapping.values()) if isinstance(mapping, dict) else []),
    "translate": lambda s, table: len(s) * max((len(v) for v in table.values() if isinstance(v, str)), default=1)
                 if isinstance(table, dict) else 0,
}


# Filters and str methods (by name) whose argument is a size: its position in the call (the value or
# text first, at 0), its keyword, and the largest it may be. round's precision is a power of ten made.
_SIZE_ARGUMENTS: dict[str, tuple[int, str, int]] = {
    "center": (1, "width", TEMPLATE_LENGTH), "ljust": (1, "width", TEMPLATE_LENGTH),
    "rjust": (1, "width", TEMPLATE_LENGTH), "zfill": (1, "width", TEMPLATE_LENGTH),
    "expandtabs": (1, "tabsize", TEMPLATE_LENGTH), "indent": (1, "width", TEMPLATE_LENGTH),
    "wordwrap": (1, "width", TEMPLATE_LENGTH), "truncate": (1, "length", TEMPLATE_LENGTH),
    "batch": (1, "linecount", TEMPLATE_LENGTH), "slice": (1, "slices", TEMPLATE_LENGTH),
    "round": (1, "precision", _NUMBER_BITS),
}


def _foresee_call(name: str, sizes: dict[str, Callable[..., int]], args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """Refuse a filter or str method (`args[0]` its text) whose result would be too big."""
    if name in _SIZE_ARGUMENTS:
        position, keyword, most = _SIZE_ARGUMENTS[name]
        size = args[position] if len(args) > position else kwargs.get(keyword)
        if type(size) is int and abs(size) > most:
            raise TemplateLimit(f"{name} was given a number past {most:,}")
    try:
        size = sizes[name](*args, **kwargs) if name in sizes else 0
    except TypeError:
        size = 0  # arguments the call itself refuses, naming them
    _refuse_size(name, size)


# Filters that go through their value item by item: each spends a step per item, as a for loop would.
_ITERATING_FILTERS = frozenset({
    "map", "select", "reject", "selectattr", "rejectattr", "sum", "join", "list", "unique", "sort", "groupby",
    "batch", "slice", "dictsort", "items", "min", "max",
})  # not tojson or string: one C call, and a long message's content|tojson must render


def _metered_items(items: Iterator[Any]) -> Iterator[Any]:
    for item in items:
        _spend(steps=1)
        yield item


def _checked_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, a Jinja filter, with its result foreseen and checked, and its items spent if it iterates.
    Every value it makes is charged to TEMPLATE_MADE (one charge a call: cheap next to a filter)."""
    @wraps(function)  # keeps jinja_pass_arg, so Jinja still passes the context first
    def checked(*args: Any, **kwargs: Any) -> Any:
        passed = 1 if args and isinstance(args[0], Context | EvalContext | Environment) else 0
        data = args[passed:]
        _foresee_call(name, _FILTER_SIZES, data, kwargs)
        if name in _ITERATING_FILTERS and data:
            value = data[0]
            if isinstance(value, Iterator):  # a generator (map, select): spent as it is drawn
                args = (*args[:passed], _metered_items(value), *data[1:])
            elif hasattr(value, "__len__"):
                _spend(steps=len(value))
        result = _checked(function(*args, **kwargs))
        if isinstance(result, _SIZED) and len(result) <= _FREE_LENGTH:
            _spend(made=len(result))  # longer ones _checked charged
        return result
    return checked


class Generation(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers'
    assistant mask; Heron masks by other means, so the body renders as it is."""
    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class NoLoader(BaseLoader):
    """No other templates: a chat template is one text."""

    def get_source(self, environment: Any, template: str) -> Any:
        raise TemplateNotFound(template, f"a chat template cannot include, import or extend another "
                                         f"template ({template!r})")


class MeteredTemplate(Template):
    """A template whose every render has a fresh meter, unset when the render ends."""

    def render(self, *args: Any, **kwargs: Any) -> str:
        token = _METER.set(_Meter())
        try:
            return super().render(*args, **kwargs)
        finally:
            _METER.reset(token)

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[str]:  # stream goes through here too
        token = _METER.set(_Meter())
        try:
            yield from super().generate(*args, **kwargs)
        finally:
            _METER.reset(token)


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, metering calls and checking what operators, calls and output make."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})  # those that can make big values
    template_class = MeteredTemplate

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator != "+":  # + makes no more than its operands hold: checked after
            _foresee_binop(operator, left, right)
        return _checked(self.binop_table[operator](left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's
        _spend(steps=1)
        if isinstance(__obj, LoopContext) and args:  # loop(items) in a recursive for: meter its items too
            args = (__self.heron_loop(args[0]), *args[1:])
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        if isinstance(getattr(method, "__self__", None), str):
            _foresee_call(method.__name__, _METHOD_SIZES, (method.__self__, *args), kwargs)
        return _checked(super().call(__context, __obj, *args, **kwargs))

    @staticmethod
    def concat(chunks: Iterable[str]) -> str:
        """Output joined, its length checked as it grows: renders, macros and blocks all join here."""
        kept, length = [], 0
        for chunk in chunks:
            length += len(chunk)
            _refuse_size("the output", length)
            kept.append(chunk)
        _spend(made=length)
        return "".join(kept)

    def heron_loop(self, items: Iterable[Any]) -> Iterator[Any]:
        for item in items:
            _spend(steps=1)
            yield item

    def heron_checked(self, value: Any) -> Any:
        return _checked(value)


@cache
def _environment() -> Any:
    """The Jinja environment transformers renders chat templates in (chat_template_utils.py):
    an immutable sandbox with loop controls, the `generation` tag, and its tojson,
    raise_exception and strftime_now; with the limits above."""

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(message)  # the caller of render names the template

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # transformers' signature; unlike Jinja's own tojson, no HTML escaping
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def metered_range(*args: int) -> range:
        numbers = safe_range(*args)  # Jinja's: at most MAX_RANGE (100,000) numbers
        _spend(steps=len(numbers))
        return numbers

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, loader=NoLoader(), extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: _checked_filter(name, function) for name, function in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = metered_range
    del env.globals["lipsum"]  # lipsum(n) writes n paragraphs; no chat template uses it
    return env


def _metered(template: Any) -> Any:
    """A parsed template whose for loops spend a step per item (`heron_loop`) and whose `~` results are
    checked (`heron_checked`): Jinja has no hook for either, so the tree is rewritten to call them."""
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    def call(name: str, node: Any) -> Any:
        return nodes.Call(nodes.EnvironmentAttribute(name, lineno=node.lineno), [node], [], None, None,
                          lineno=node.lineno)

    class Metered(NodeTransformer):
        def visit_For(self, node: Any) -> Any:
            node = self.generic_visit(node)
            node.iter = call("heron_loop", node.iter)
            return node

        def visit_Concat(self, node: Any) -> Any:
            return call("heron_checked", self.generic_visit(node))

    return Metered().visit(template)


@lru_cache(maxsize=16)
def compiled(template: str) -> Any:
    from jinja2 import TemplateError

    try:
        return _environment().from_string(_metered(_environment().parse(template)))
    except TemplateError as err:
        raise ChatTemplateError(f"chat template does not parse: {err}") from err


__all__ = ["ChatTemplateError", "TemplateLimit", "compiled"]
