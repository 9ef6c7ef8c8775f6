"""Chat templates in a bounded sandbox: compile once, render within time, size and loop limits.

A chat template is code that travels inside a model file, so rendering it is
bounded the way a reader bounds a header: jinja2's immutable sandbox (no
attribute escapes), plus a budget every hook charges (calls, range steps,
attribute reads), checks on every string the template builds (`~`, `+`, `*`,
`%`, filters), a cap on integer arguments, and a wall-clock limit enforced
from outside the rendering thread. The environment matches what Hugging Face
gives templates (trim_blocks, lstrip_blocks, loop controls, `{% generation %}`,
raise_exception, strftime_now), so a template that renders there renders here.
"""

from __future__ import annotations

import ctypes
import re
import threading
import time
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from formats.errors import BadChatTemplate, ChatTemplateLimit

TIME_LIMIT_S = 1.0  # wall clock per render
MAX_STEPS = 2_000_000  # calls + range steps + attribute reads per render
MAX_RANGE = 100_000  # items in one range(), as jinja2's sandbox
MAX_INT_ARG = 1_000_000  # largest integer argument to a call or filter (str.center(10**9)...)
MAX_POW_EXP = 1024
MIN_TEXT = 1_000_000  # characters any one string may reach, at least
_FORMAT_WIDTH = re.compile(r"%[-+ #0]*(\d+)?(?:\.(\d+))?")


class _Abort(BaseException):
    """Raised inside the rendering thread when its time is up (never caught by templates)."""


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (Hugging Face's assistant mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _CheckedConcat(CodeGenerator):
    """`a ~ b` goes through the environment, so strings built by concatenation are bounded too."""

    def visit_Concat(self, node, frame):
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Budget:
    def __init__(self, text_limit: int, deadline: float):
        self.steps = 0
        self.text_limit = text_limit
        self.deadline = deadline


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment whose every call, loop step and string is charged to a budget."""

    code_generator_class = _CheckedConcat
    intercepted_binops = frozenset(["*", "**", "+", "%", "//"])

    def __init__(self):
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.Undefined,
            extensions=[loopcontrols, _GenerationTag],
        )
        self._local = threading.local()
        self.globals["range"] = self._range
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(str(fmt))
        self.filters = {name: self._checked_filter(name, f) for name, f in self.filters.items()}

    # ---- the budget
    @property
    def budget(self) -> _Budget | None:
        return getattr(self._local, "budget", None)

    def charge(self, n: int = 1) -> None:
        b = self.budget
        if b is None:
            return
        b.steps += n
        if b.steps > MAX_STEPS:
            raise ChatTemplateLimit(
                f"the chat template passed the sandbox's limit of {MAX_STEPS} steps"
            )
        if b.steps % 256 == 0 and time.monotonic() > b.deadline:
            raise ChatTemplateLimit(f"the chat template ran past its {TIME_LIMIT_S:g} s limit")

    def check_size(self, value, what: str):
        if isinstance(value, (str, list, tuple, dict)):
            self._check_len(len(value), what)
        return value

    def _check_len(self, n: int, what: str) -> None:
        b = self.budget
        if b is not None and n > b.text_limit:
            raise ChatTemplateLimit(
                f"the chat template built {what} of {n} items, over the sandbox's limit of {b.text_limit}"
            )

    def _check_args(self, args, kwargs, what: str) -> None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_INT_ARG:
                raise ChatTemplateLimit(
                    f"the chat template passed {a} to {what}, over the sandbox's limit of {MAX_INT_ARG}"
                )

    # ---- hooks jinja2 calls
    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        __self.charge()
        __self._check_args(args, kwargs, getattr(__obj, "__name__", "a call").lstrip("_"))
        return __self.check_size(super().call(__context, __obj, *args, **kwargs), "a call's result")

    def getattr(self, obj, attribute):
        self.charge()
        return self.check_size(super().getattr(obj, attribute), "a value")

    def getitem(self, obj, argument):
        self.charge()
        return self.check_size(super().getitem(obj, argument), "a value")

    def call_binop(self, context, operator, left, right):
        self.charge()
        if operator == "**" and isinstance(right, int) and abs(right) > MAX_POW_EXP:
            raise ChatTemplateLimit(
                f"the chat template raises to the power {right}, over the sandbox's limit of {MAX_POW_EXP}"
            )
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    self._check_len(len(seq) * max(n, 0), "a repeated value")
        if operator == "%" and isinstance(left, str):
            for width, prec in _FORMAT_WIDTH.findall(left):
                if max(int(width or 0), int(prec or 0)) > MAX_INT_ARG:
                    raise ChatTemplateLimit(
                        f"the chat template formats a field wider than the sandbox's limit of {MAX_INT_ARG}"
                    )
        return self.check_size(super().call_binop(context, operator, left, right), "a value")

    def checked_concat(self, parts):
        self.charge()
        out = "".join(map(str, parts))
        return self.check_size(out, "a string")

    def _range(self, *args):
        self._check_args(args, {}, "range")
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise ChatTemplateLimit(
                f"the chat template asks for a range of {len(r)} items, over the sandbox's limit of {MAX_RANGE}"
            )
        return _BoundedRange(r, self)

    def _checked_filter(self, name: str, f):
        # the value filtered comes after the context jinja2 passes to marked filters
        skip = 2 if hasattr(f, "jinja_pass_arg") else 1

        def run(*args, **kwargs):
            self.charge()
            self._check_args(args[skip:], kwargs, f"the filter {name!r}")
            return self.check_size(f(*args, **kwargs), f"the filter {name!r}'s result")

        if hasattr(f, "jinja_pass_arg"):
            run.jinja_pass_arg = f.jinja_pass_arg
        return run


class _BoundedRange:
    """A range whose iteration charges the budget one step per item."""

    def __init__(self, r: range, env: BoundedSandbox):
        self.r, self.env = r, env

    def __iter__(self):
        for i in self.r:
            self.env.charge()
            yield i

    def __reversed__(self):
        return iter(_BoundedRange(self.r[::-1], self.env))

    def __len__(self):
        return len(self.r)

    def __contains__(self, x):
        return x in self.r

    def __getitem__(self, i):
        return self.r[i]


def _raise_exception(message):
    raise jinja2.TemplateError(str(message))


_ENV = BoundedSandbox()


def compile_template(source: str, where: str = "the chat template") -> jinja2.Template:
    """Compile a chat template in the bounded sandbox.

    Raises:
        BadChatTemplate: it is not a string or does not compile; the message has the line.
    """
    if not isinstance(source, str):
        raise BadChatTemplate(f"{where} is a {type(source).__name__}, not text")
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise BadChatTemplate(f"{where} does not compile: {e.message} (line {e.lineno})") from None
    except (jinja2.TemplateError, RecursionError, MemoryError, ValueError) as e:
        raise BadChatTemplate(f"{where} does not compile: {e}") from None


def render(
    template: jinja2.Template,
    variables: dict,
    *,
    time_limit: float = TIME_LIMIT_S,
    text_limit: int | None = None,
) -> str:
    """Render a compiled template within the sandbox's limits.

    Args:
        template: from compile_template.
        variables: messages, add_generation_prompt, bos_token...
        time_limit: wall-clock seconds.
        text_limit: the most characters the output, or any string built, may have;
            default: MIN_TEXT or 4x the variables' text, whichever is larger.
    Returns:
        The rendered text.
    Raises:
        ChatTemplateLimit: the render ran past a limit (it is stopped, not left running).
        BadChatTemplate: the template raised (raise_exception, an undefined call, a type error).
    """
    limit = text_limit or max(MIN_TEXT, 4 * _text_size(variables))
    result: dict = {}

    def work():
        _ENV._local.budget = _Budget(limit, time.monotonic() + time_limit)
        try:
            pieces, size = [], 0
            for piece in template.generate(**variables):
                size += len(piece)
                if size > limit:
                    raise ChatTemplateLimit(
                        f"the chat template's output passed the limit of {limit} characters"
                    )
                pieces.append(piece)
            result["text"] = "".join(pieces)
        except _Abort:
            pass
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e
        finally:
            _ENV._local.budget = None

    t = threading.Thread(target=work, name="chat-template", daemon=True)
    t.start()
    t.join(time_limit + 0.5)
    if t.is_alive():  # stuck between hooks: stop it from outside and leave it
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(t.ident), ctypes.py_object(_Abort)
        )
        t.join(0.5)
        raise ChatTemplateLimit(f"the chat template ran past its {time_limit:g} s limit")
    err = result.get("error")
    if err is None:
        return result["text"]
    if isinstance(err, BadChatTemplate):
        raise err
    if isinstance(err, RecursionError):
        raise ChatTemplateLimit(
            "the chat template recursed past the interpreter's depth limit"
        ) from None
    if isinstance(err, MemoryError):
        raise ChatTemplateLimit(
            "the chat template ran out of memory (no limit could stop it)"
        ) from None
    raise BadChatTemplate(f"the chat template failed: {type(err).__name__}: {err}") from None


def _text_size(value, depth: int = 0) -> int:
    if isinstance(value, str):
        return len(value)
    if depth > 8:
        return 0
    if isinstance(value, dict):
        return sum(_text_size(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_text_size(v, depth + 1) for v in value)
    return 0
