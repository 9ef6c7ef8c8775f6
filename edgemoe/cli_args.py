"""What the command line shares across subcommands: argument types, the one-line error
parser, Python names -> flags in error messages, and text arguments that are not UTF-8.

Every numeric flag goes through one of the types here, so a bad value (0 where a count
is needed, nan, a 400-digit size) is refused by argparse with one line naming the flag
and what it takes, exit status 2, before anything is loaded.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from edgemoe.units import MAX_BYTES, Bytes

EXIT_BAD_INPUT = 2
MAX_COUNT = 2**31  # the largest count any flag takes (tokens, context, batch)

# The Python API names its parameters in errors (`err.param`, "ctx=5 is ..."); the CLI
# shows its flags instead. One table: Python parameter -> flag.
FLAGS = {
    "mem": "--mem",
    "ctx": "--ctx",
    "batch": "--batch",
    "max_tokens": "--max-tokens",
    "level": "--level",
    "bits": "--bits-policy",
    "dtype": "--dtype",
    "device": "--device",
    "prompt": "--prompt",
    "threads": "--threads",
    "stop": "--stop",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "repetition_penalty": "--repeat-penalty",
    "repeat_last_n": "--repeat-last-n",
    "seed": "--seed",
}
# names that are no English word become flags anywhere in a message; the others ("batch",
# "prompt") only as `name=value` or when they are the parameter the error names
_CODE_NAMES = [k for k in FLAGS if "_" in k or k in ("ctx", "mem", "dtype")]
_ASSIGN = re.compile(r"(?<![\w.-])(" + "|".join(FLAGS) + r")=")
_CODE = re.compile(r"(?<![\w.-])(" + "|".join(_CODE_NAMES) + r")(?![\w(=])")
_PHRASES = {"help(edgemoe.load)": "`edgemoe run --help`", "load with": "run with"}


def flag_message(err: BaseException) -> str:
    """An error's one-line message as the CLI shows it: Python parameter names become flags.

    `ctx=5` becomes `--ctx 5`; names that are no English word (ctx, max_tokens) become
    flags anywhere; the parameter the error names (`err.param`) becomes its flag in the
    fix too ("raise mem" -> "raise --mem"). Errors without `param` are shown as they are.
    """
    text = " ".join(str(err).split())
    param = getattr(err, "param", None)
    if not isinstance(param, str) or not param:
        return text
    what, fix = getattr(err, "what", None), getattr(err, "fix_hint", None)
    if isinstance(what, str) and isinstance(fix, str):
        fix = " ".join(fix.split())
        if param in FLAGS:
            fix = re.sub(rf"(?<![\w.-]){param}(?![\w=(])", FLAGS[param], fix)
        text = f"{' '.join(what.split())}; {fix}"
    text = _ASSIGN.sub(lambda m: FLAGS[m.group(1)] + " ", text)
    text = _CODE.sub(lambda m: FLAGS[m.group(1)], text)
    for api, cli in _PHRASES.items():
        text = text.replace(api, cli)
    return text


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `edgemoe: error: argument --ctx: ...; see ... --help`."""

    def error(self, message: str):
        self.exit(
            EXIT_BAD_INPUT,
            f"edgemoe: error: {' '.join(message.split())}; see `{self.prog} --help`\n",
        )


def count(lo: int = 1, hi: int = MAX_COUNT):
    """An argparse type: a whole number from lo to hi."""

    allowed = f"{lo} or more" if hi == MAX_COUNT else f"{lo} to {hi}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{_show(text)} is not a whole number; give {allowed}"
            ) from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{_show(text)} is out of range; give {allowed}")
        return v

    parse.__name__ = "count"
    return parse


def number(lo: float, hi: float = math.inf, *, above: bool = False, rule: str = ""):
    """An argparse type: a finite number from lo (excluded when above) to hi."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not math.isfinite(v) or v < lo or v > hi or (above and v == lo):
            raise argparse.ArgumentTypeError(
                f"{_show(text)} is not allowed; give {rule or 'a finite number'}"
            )
        return v

    parse.__name__ = "number"
    return parse


def size(text: str) -> Bytes:
    """An argparse type: a byte size above 0 and at most 1 EiB (4GB, 512MiB, 0.5G)."""
    try:
        v = Bytes.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if v == 0 or v > MAX_BYTES:
        raise argparse.ArgumentTypeError(
            f"{_show(text)} is not allowed; give a size above 0, e.g. 4GB or 512MiB"
        )
    return v


def _show(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


# run's sampling flags: Sampling's field names; None leaves Sampling's own default
SAMPLING_FLAGS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "repeat_last_n",
    "seed",
)


def sampling_flags(r: argparse.ArgumentParser) -> None:
    """run's sampling flags, their defaults shown from Sampling() (the one place they live)."""
    from edgemoe.sampling import Sampling

    d = Sampling()
    g = r.add_argument_group("sampling (defaults as llama.cpp's; --temperature 0 is greedy)")
    g.add_argument(
        "--temperature",
        type=number(0, rule="0 (greedy) or more"),
        help=f"0 = greedy, the most likely token every time (default {d.temperature})",
    )
    g.add_argument("--top-k", type=count(0), help=f"0 = off (default {d.top_k})")
    g.add_argument(
        "--top-p",
        type=number(0, 1, above=True, rule="more than 0, at most 1"),
        help=f"1 = off (default {d.top_p})",
    )
    g.add_argument("--min-p", type=number(0, 1, rule="0 to 1"), help=f"0 = off (default {d.min_p})")
    g.add_argument(
        "--repeat-penalty",
        dest="repetition_penalty",
        metavar="PENALTY",
        type=number(0, above=True, rule="more than 0 (1 = off)"),
        help=f"on tokens of the last --repeat-last-n; 1 = off (default {d.repetition_penalty})",
    )
    g.add_argument(
        "--repeat-last-n", type=count(0), help=f"0 = no penalty (default {d.repeat_last_n})"
    )
    g.add_argument("--seed", type=count(0, 2**64 - 1), help="same seed, same output")


# ---- text that is not UTF-8


def utf8_text(value: str, what: str) -> str:
    """Text from argv or stdin, where bytes that are not UTF-8 arrive as surrogate escapes:
    they become U+FFFD, with a warning on stderr (llama.cpp and Ollama also take such text)."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    fixed = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    print(
        f"edgemoe: warning: {what} is not valid UTF-8; its undecodable bytes became U+FFFD",
        file=sys.stderr,
    )
    return fixed


def utf8_args(args: argparse.Namespace, names=("prompt", "stop")) -> None:
    """Apply utf8_text to the text flags (never to paths: a file name may be any bytes)."""
    for name in names:
        value = getattr(args, name, None)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, str):
            setattr(args, name, utf8_text(value, flag))
        elif isinstance(value, list):
            setattr(args, name, [utf8_text(v, flag) if isinstance(v, str) else v for v in value])
