"""What a benchmark needs before it runs: the two model files and llama-bench.

The GGUF comes from llama.cpp's own converter (convert_hf_to_gguf.py, never
ours), the .emoe from `edgemoe convert`; both are cached under
~/.cache/edgemoe/bench/conv/ by the content hash of their source, so a second
bench of the same checkpoint converts nothing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgemoe.bench.models import LLAMACPP_PRE
from formats.errors import EmoeError

CACHE = Path(os.environ.get("EDGEMOE_CACHE", Path.home() / ".cache" / "edgemoe"))
BUILD_HINT = "tools/llamacpp_build.sh ~/.cache/edgemoe"
CONVERT_HINT = "tools/llamacpp_convert.sh ~/.cache/edgemoe"

# Runs llama.cpp's converter unchanged but for two functions, and only for our bench
# models: their tokenizer's pre-tokenizer hash is unknown to llama.cpp, so its name is
# given, and they have no tokenizer.model, so the SentencePiece path is skipped.
_RUNNER = """
import os, runpy, sys
script, pre = sys.argv[1], sys.argv[2]
here = os.path.dirname(os.path.abspath(script))
sys.argv = [script] + sys.argv[3:]
sys.path[:0] = [here, os.path.join(here, "gguf-py")]
if pre:
    import conversion.base as base
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    def no_sentencepiece(self, *args, **kwargs):
        raise FileNotFoundError("no tokenizer.model")
    base.TextModel._set_vocab_sentencepiece = no_sentencepiece
runpy.run_path(script, run_name="__main__")
"""


class LlamaBenchMissing(EmoeError):
    fix = f"build it (5-35 minutes on 2 cores): {BUILD_HINT}; or pass --llama-bench PATH"


class LlamaConverterMissing(EmoeError):
    fix = f"fetch it: {CONVERT_HINT}; or pass --llama-convert PATH"


class BenchInputError(EmoeError):
    fix = (
        "pass a Hugging Face folder, a .gguf, or a .emoe with --gguf FILE (see `edgemoe bench -h`)"
    )


@dataclass(frozen=True)
class Prepared:
    """The files one bench runs on.

    Attributes:
        name: the model's name in tables (the folder or file stem).
        emoe: the .emoe edgemoe runs.
        gguf: the GGUF llama.cpp runs, or None without a llama.cpp baseline.
        about: one line on the model (shape, parameters), for the doc.
    """

    name: str
    emoe: Path
    gguf: Path | None
    about: str


def describe(cfg: dict) -> str:
    """One line on a model config: family, sizes, experts."""
    experts = next(
        (cfg[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if cfg.get(k)),
        "?",
    )
    inter = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    return (
        f"{cfg.get('model_type')}, hidden {cfg.get('hidden_size')}, {cfg.get('num_hidden_layers')} "
        f"layers, {experts} experts top-{cfg.get('num_experts_per_tok')} of intermediate {inter}, "
        f"vocab {cfg.get('vocab_size')}"
    )


def converter_stamp() -> str:
    """A key of the code that decides an .emoe's bytes (writer, constants, codecs, converters):
    a cached conversion made by an older converter (say, zstd on INT8 experts) is not reused."""
    import formats

    root = Path(formats.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def content_key(path: Path, extra: str = "") -> str:
    """A hex key of a file's or folder's bytes (memoized by name, size and mtime).

    Args:
        path: a file, or a folder whose regular files are hashed in name order.
        extra: mixed into the key (the conversion's options).
    """
    memo_path = CACHE / "bench" / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    outer = hashlib.sha256(extra.encode())
    for f in files:
        st = f.stat()
        stamp = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if stamp not in memo:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
            memo[stamp] = h.hexdigest()
        rel = f.relative_to(path) if path.is_dir() else Path(f.name)
        outer.update(f"{rel}\0{memo[stamp]}\n".encode())
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(memo, indent=0))
    tmp.replace(memo_path)
    return outer.hexdigest()[:16]


def find_llama_bench(explicit: str | None = None) -> Path:
    """llama-bench: --llama-bench, $EDGEMOE_LLAMA_BENCH, PATH, or the build cache.

    Raises:
        LlamaBenchMissing: none found; the message gives the build command.
    """
    for cand in (explicit, os.environ.get("EDGEMOE_LLAMA_BENCH"), shutil.which("llama-bench")):
        if cand:
            if Path(cand).is_file() and os.access(cand, os.X_OK):
                return Path(cand)
            raise LlamaBenchMissing(f"llama-bench {cand} is not an executable file")
    built = sorted(glob.glob(str(CACHE / "llama-bench-*" / "bin" / "llama-bench")))
    if built:
        return Path(built[-1])
    raise LlamaBenchMissing(f"no llama-bench on PATH or under {CACHE}")


def find_llama_convert(explicit: str | None = None) -> Path:
    """convert_hf_to_gguf.py: --llama-convert, $EDGEMOE_LLAMACPP_CONVERT or the cache.

    Raises:
        LlamaConverterMissing: none found; the message gives the fetch command.
    """
    cand = explicit or os.environ.get("EDGEMOE_LLAMACPP_CONVERT")
    if cand:
        if Path(cand).is_file():
            return Path(cand)
        raise LlamaConverterMissing(f"llama.cpp converter {cand} does not exist")
    found = sorted(
        glob.glob(str(CACHE / "llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    )
    if found:
        return Path(found[-1])
    raise LlamaConverterMissing(f"no convert_hf_to_gguf.py under {CACHE}")


def _run(cmd: list[str], what: str) -> None:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    print(f"bench: {what}: {' '.join(cmd[:2])} ...", file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise EmoeError(
            f"{what} failed (exit {p.returncode}): {p.stderr.strip()[-1500:]}",
            "see the message above",
        )


def to_gguf(hf: Path, converter: Path, outtype: str = "q8_0") -> Path:
    """The GGUF of a Hugging Face folder, made by llama.cpp's converter (cached)."""
    bench = hf / "bench_model.json"
    pre = LLAMACPP_PRE if bench.is_file() else ""
    out = (
        CACHE
        / "bench"
        / "conv"
        / content_key(hf, f"gguf:{outtype}:{converter}")
        / f"model-{outtype}.gguf"
    )
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_suffix(".part")
        cmd = [sys.executable, "-c", _RUNNER, str(converter), pre, str(hf)]
        _run(
            cmd + ["--outtype", outtype, "--outfile", str(part)],
            f"llama.cpp convert {hf.name} -> {outtype}",
        )
        part.replace(out)
    return out


def to_emoe(src: Path, experts: str = "int8", dense: str = "int8") -> Path:
    """The .emoe of a Hugging Face folder or GGUF, made by `edgemoe convert` (cached)."""
    out = (
        CACHE
        / "bench"
        / "conv"
        / content_key(src, f"emoe:{experts}:{dense}:{converter_stamp()}")
        / f"model-{experts}.emoe"
    )
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "edgemoe.cli", "convert", str(src), str(out)]
        _run(
            cmd + ["--experts", experts, "--dense", dense, "-q"],
            f"edgemoe convert {src.name} -> {experts}",
        )
    return out


def prepare(
    model: str | Path,
    *,
    baseline: bool,
    gguf: str | None = None,
    experts: str = "int8",
    dense: str = "int8",
    outtype: str = "q8_0",
    converter: str | None = None,
) -> Prepared:
    """Find or make the .emoe and (with a baseline) the GGUF for `model`.

    Args:
        model: a Hugging Face folder, a .gguf or a .emoe.
        baseline: a llama.cpp baseline runs, so a GGUF is needed.
        gguf: the GGUF to use as is (skips llama.cpp's converter).
        experts, dense: `edgemoe convert` codecs for a .emoe made here.
        outtype: llama.cpp converter --outtype for a GGUF made here.
        converter: convert_hf_to_gguf.py (default: found by find_llama_convert).
    Raises:
        BenchInputError: the model is none of the three, or a .emoe without --gguf.
    """
    path = Path(model).expanduser()
    about = ""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BenchInputError(f"{path} has no config.json")
        about = describe(json.loads((path / "config.json").read_text()))
        if (path / "bench_model.json").is_file():
            made = json.loads((path / "bench_model.json").read_text())
            about += f"; {made['params'] / 1e9:.2f} B parameters, random (seed {made['seed']})"
        emoe = to_emoe(path, experts, dense)
        if baseline and gguf is None:
            gguf = to_gguf(path, find_llama_convert(converter), outtype)
    elif path.suffix == ".gguf" and path.is_file():
        emoe = to_emoe(path, experts, dense)
        gguf = gguf or path
    elif path.suffix == ".emoe" and path.is_file():
        emoe = path
        from formats.reader import EmoeReader

        with EmoeReader(path) as r:
            about = describe({"model_type": r.family, **r.config})
        if baseline and gguf is None:
            raise BenchInputError(
                f"{path} is a .emoe: llama.cpp needs the same model as a GGUF (--gguf FILE)"
            )
    else:
        raise BenchInputError(f"{path} is not a model folder, a .gguf or a .emoe")
    name = path.name.removesuffix(".emoe").removesuffix(".gguf")
    return Prepared(name, emoe, Path(gguf) if (baseline and gguf) else None, about)
