"""Train the bundled demo model: a tiny Qwen3-MoE from scratch on Debian documentation.

One script does everything: extract English text from Debian packages, train a
byte-level BPE tokenizer, train a Qwen3MoeForCausalLM on CPU for a wall-clock
budget, measure held-out perplexity, sample, save the Hugging Face folder and
convert it to edgemoe/demo/demo.emoe with TRAINING.json and README.md beside it.

    apt-get install -y python3.11-doc postgresql-doc-15 linux-doc bible-kjv
    python tools/train_demo.py --minutes 40

The model is a demo of the runtime (routed experts are ~90% of its bytes), not
a useful language model: a few minutes of two CPU cores buys a few million tokens.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("python3.11-doc", "postgresql-doc-15", "linux-doc", "bible-kjv")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")  # ids 0..3
EOT, IM_START, IM_END, PAD = range(4)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PROMPTS = ("The function returns", "In the beginning", "The database server")


# ---------------------------------------------------------------- data


class _TextOf(HTMLParser):
    """Visible text of an HTML page, minus scripts, styles and navigation blocks."""

    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd"}
    SKIP_CLASS = re.compile(r"related|sphinxsidebar|footer|navheader|navfooter|headerlink")

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip: tuple[str, int] | None = None  # (tag, nesting depth) being skipped

    def handle_starttag(self, tag, attrs):
        if self.skip is not None:
            if tag == self.skip[0]:
                self.skip = (tag, self.skip[1] + 1)
            return
        cls = dict(attrs).get("class") or ""
        if tag in ("script", "style", "head") or self.SKIP_CLASS.search(cls):
            self.skip = (tag, 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.skip is not None:
            if tag == self.skip[0]:
                depth = self.skip[1] - 1
                self.skip = None if depth == 0 else (tag, depth)
            return
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip is None:
            self.parts.append(data)


def _tidy(text: str) -> str:
    """Collapse runs of blank lines and spaces; drop reST underline rows such as '====='."""
    lines = []
    for line in text.splitlines():
        line = re.sub(r"[ \t\u00a0]+", " ", line).strip()
        if re.fullmatch(r"([=\-~^*#+`:.])\1{3,}", line):
            continue
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip()


def html_text(raw: str) -> str:
    p = _TextOf()
    p.feed(raw)
    p.close()
    return _tidy("".join(p.parts).replace("\u00b6", ""))


def _read(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def missing_packages() -> list[str]:
    missing = []
    for pkg in PACKAGES:
        r = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
        )
        if r.returncode != 0 or "install ok installed" not in r.stdout:
            missing.append(pkg)
    return missing


def bible_documents() -> list[tuple[str, str]]:
    """The King James Bible, one document per chapter, verse references stripped."""
    out = subprocess.run(
        ["bible", "-f", "-l", "0", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True
    ).stdout
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"^(\w+?\d*?)(\d+):(\d+) (.*)$", line)
        if m:
            chapters.setdefault(f"{m.group(1)}{m.group(2)}", []).append(m.group(4).strip())
    return [(f"bible/{k}", " ".join(v)) for k, v in chapters.items()]


def documents() -> list[tuple[str, str]]:
    """(name, text) for every document, in a fixed order."""
    docs: list[tuple[str, str]] = []
    py = Path("/usr/share/doc/python3.11/html")
    for p in sorted(py.rglob("*.html")):
        rel = p.relative_to(py).as_posix()
        if rel.startswith(("_", "genindex", "search", "py-modindex")):
            continue
        docs.append((f"python/{rel}", html_text(_read(p))))
    pg = Path("/usr/share/doc/postgresql-doc-15/html")
    for p in sorted(pg.glob("*.html")):
        if p.name.startswith(("bookindex", "index")):
            continue
        docs.append((f"postgresql/{p.name}", html_text(_read(p))))
    lx = next(iter(sorted(Path("/usr/share/doc").glob("linux-doc-*/Documentation"))), None)
    if lx is not None:  # the reST sources; the html/ tree holds the same text again
        for p in sorted(lx.rglob("*.gz")):
            if p.name.endswith((".rst.gz", ".txt.gz")):
                docs.append((f"linux/{p.relative_to(lx).as_posix()}", _tidy(_read(p))))
    docs += bible_documents()
    return [(n, t) for n, t in docs if len(t) >= 200]


def split(docs, every: int):
    """Every `every`-th document is held out; the rest is training text."""
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    return train, held


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab: int, max_chars: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def take():
        n = 0
        for t in texts:
            if n >= max_chars:
                return
            n += len(t)
            yield t

    tok.train_from_iterator(take(), trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def encode(tok, texts: list[str]) -> np.ndarray:
    """All documents as one token stream, each followed by <|endoftext|>."""
    ids: list[int] = []
    for i in range(0, len(texts), 256):
        for enc in tok.encode_batch(texts[i : i + 256]):
            ids.extend(enc.ids)
            ids.append(EOT)
    return np.asarray(ids, dtype=np.int16)


def save_tokenizer(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIALS[EOT],
        "eos_token": SPECIALS[EOT],
        "pad_token": SPECIALS[PAD],
        "unk_token": None,
        "additional_special_tokens": [SPECIALS[IM_START], SPECIALS[IM_END]],
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


# ---------------------------------------------------------------- model


def build_model(args):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        head_dim=args.head_dim,
        num_key_value_heads=args.kv_heads,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_width,
        intermediate_size=args.expert_width * args.top_k,  # unused: every layer is MoE
        norm_topk_prob=True,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        bos_token_id=EOT,
        eos_token_id=EOT,
        pad_token_id=PAD,
    )
    cfg._experts_implementation = args.experts_impl
    torch.manual_seed(args.seed)
    return Qwen3MoeForCausalLM(cfg)


def param_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    return {"total": total, "routed_experts": routed, "routed_share": round(routed / total, 4)}


def lr_at(step: int, frac: float, args) -> float:
    """Linear warmup over steps, then cosine to lr/10 over the fraction of the run done."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train(model, data: np.ndarray, args, log) -> dict:
    import torch

    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8
    )
    rng = np.random.default_rng(args.seed)
    n_seq = (len(data) - 1) // args.seq
    order = rng.permutation(n_seq)
    budget = args.minutes * 60.0
    model.train()
    t0 = time.time()
    step = tokens = pos = 0
    losses: list[float] = []
    win_t, win_tok = t0, 0

    def progress() -> float:  # share of the run done: of --steps if given, else of the clock
        return step / args.steps if args.steps else (time.time() - t0) / budget

    while progress() < 1.0:
        if pos + args.batch > n_seq:
            order, pos = rng.permutation(n_seq), 0
        starts = order[pos : pos + args.batch] * args.seq
        pos += args.batch
        x = torch.from_numpy(
            np.stack([data[s : s + args.seq + 1] for s in starts]).astype(np.int64)
        )
        lr = lr_at(step, progress(), args)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            out = model(input_ids=x[:, :-1], labels=x[:, :-1])
        # out.loss = next-token CE + aux_coef * load-balancing loss
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ce = float(out.loss.detach()) - args.aux_coef * float(out.aux_loss.detach())
        losses.append(ce)
        step += 1
        tokens += x[:, :-1].numel()
        win_tok += x[:, :-1].numel()
        if step % args.log_every == 0:
            now = time.time()
            log(
                f"step {step:5d}  loss {np.mean(losses[-args.log_every :]):.3f}  "
                f"aux {float(out.aux_loss.detach()):.3f}  lr {lr:.2e}  "
                f"{win_tok / (now - win_t):6.0f} tok/s  {tokens / 1e6:.2f}M tok  "
                f"{(now - t0) / 60:5.1f} min"
            )
            win_t, win_tok = now, 0
    wall = time.time() - t0
    return {
        "steps": step,
        "tokens_seen": tokens,
        "wall_s": round(wall, 1),
        "tokens_per_s": round(tokens / wall, 1),
        "final_train_loss": round(float(np.mean(losses[-20:])), 4),
        "epochs": round(tokens / max(1, len(data)), 3),
    }


def heldout_ppl(model, data: np.ndarray, args) -> tuple[int, float]:
    """Perplexity of next-token prediction on the first --eval-tokens of the held-out split."""
    import torch
    import torch.nn.functional as F

    model.eval()
    n_seq = min(len(data) - 1, args.eval_tokens) // args.seq
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n_seq, args.batch):
            rows = range(i, min(n_seq, i + args.batch))
            x = torch.from_numpy(
                np.stack([data[r * args.seq : r * args.seq + args.seq + 1] for r in rows]).astype(
                    np.int64
                )
            )
            logits = model(input_ids=x[:, :-1], output_router_logits=False).logits
            nll += float(
                F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum")
            )
            count += x[:, 1:].numel()
    return count, math.exp(nll / count)


def samples(model, tok, args) -> list[dict]:
    import torch

    model.eval()
    out = []
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([[EOT] + tok.encode(prompt).ids])
        row = {"prompt": prompt}
        for name, kw in (("greedy", {"do_sample": False}), ("t0.8", {"do_sample": True})):
            torch.manual_seed(args.seed + i)
            if kw["do_sample"]:
                kw = {**kw, "temperature": 0.8, "top_k": 0, "top_p": 1.0}
            g = model.generate(
                ids, max_new_tokens=args.sample_tokens, pad_token_id=PAD, eos_token_id=EOT, **kw
            )
            row[name] = prompt + tok.decode(g[0, ids.shape[1] :].tolist())
        out.append(row)
    return out


# ---------------------------------------------------------------- outputs


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "platform": platform.platform()}


def write_readme(path: Path, rep: dict) -> None:
    s, p, t = rep["shape"], rep["params"], rep["training"]
    lines = [
        "# Demo model",
        "",
        "`demo.emoe` is a tiny Qwen3-MoE (`model_type` `qwen3_moe`) trained from scratch on CPU,",
        "bundled so edgemoe can be tried without downloading anything. It writes English-looking",
        "text with recognisable words; it is not a useful language model.",
        "",
        f"- Shape: {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads x {s['head_dim']}"
        f" ({s['kv_heads']} KV), {s['experts']} routed experts top-{s['top_k']}, expert width"
        f" {s['expert_width']}, BPE vocab {s['vocab']}, untied embeddings.",
        f"- Parameters: {p['total'] / 1e6:.1f}M, of which routed experts"
        f" {p['routed_experts'] / 1e6:.1f}M ({p['routed_share']:.0%}).",
        f"- Data: {', '.join(rep['data']['packages'])} (Debian packages), "
        f"{rep['data']['documents']} documents; every {rep['data']['heldout_every']}th held out.",
        f"- Training: {t['tokens_seen'] / 1e6:.2f}M tokens in {t['wall_s'] / 60:.1f} min"
        f" ({t['tokens_per_s']:.0f} tokens/s, {t['steps']} steps, {rep['dtype']})"
        f" on {rep['machine']['nproc']} cores of {rep['machine']['cpu']}, shared with other jobs.",
        f"- Final train loss {t['final_train_loss']:.3f};"
        f" held-out perplexity {rep['heldout']['perplexity']:.1f}"
        f" over {rep['heldout']['tokens']} tokens.",
        f"- File: {rep['emoe']['bytes'] / 1e6:.1f} MB (dense bf16, experts int8).",
        "",
        "Samples (greedy, then temperature 0.8):",
        "",
    ]
    for row in rep["samples"]:
        lines += [f"    {row['greedy']!r}", f"    {row['t0.8']!r}", ""]
    lines += [
        "Retrain (needs the packages above; `apt-get install -y " + " ".join(PACKAGES) + "`):",
        "",
        f"    {rep['command']}",
        "",
        "All numbers are in `TRAINING.json`.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock training budget")
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="train this many steps instead of --minutes (the cosine runs over steps): "
        "repeats a recorded run on a slower or busier machine",
    )
    ap.add_argument("--out", type=Path, default=Path("/work/demo-train/hf"), help="HF folder")
    ap.add_argument("--cache", type=Path, default=Path("/work/demo-train/cache"))
    ap.add_argument("--emoe", type=Path, default=REPO / "edgemoe/demo/demo.emoe")
    ap.add_argument("--report", type=Path, default=None, help="default: beside --emoe")
    ap.add_argument("--max-mb", type=float, default=40.0, help="fail if the .emoe is larger")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-every", type=int, default=50)
    ap.add_argument("--tok-chars", type=int, default=40_000_000, help="BPE training text")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-width", type=int, default=384)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--experts-impl", default="grouped_mm", help="transformers experts kernel")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32", help="bf16 = autocast")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-tokens", type=int, default=200_000)
    ap.add_argument("--sample-tokens", type=int, default=40)
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    missing = missing_packages()
    if missing:
        print("missing Debian packages; install them with:", file=sys.stderr)
        print(f"  apt-get install -y {' '.join(missing)}", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(args.threads)
    t_start = time.time()
    args.cache.mkdir(parents=True, exist_ok=True)
    docs = documents()
    train_docs, held_docs = split(docs, args.heldout_every)
    log(
        f"{len(docs)} documents ({sum(len(t) for _, t in docs) / 1e6:.1f}M chars); "
        f"{len(held_docs)} held out"
    )
    random.Random(args.seed).shuffle(train_docs)  # mix the sources; held-out order stays fixed
    train_texts = [t for _, t in train_docs]
    tok = train_tokenizer(train_texts, args.vocab, args.tok_chars)
    train_ids = encode(tok, train_texts)
    held_ids = encode(tok, [t for _, t in held_docs])
    log(
        f"tokenizer {tok.get_vocab_size()}; {len(train_ids) / 1e6:.2f}M train tokens, "
        f"{len(held_ids) / 1e6:.2f}M held-out tokens ({time.time() - t_start:.0f}s)"
    )

    model = build_model(args)
    counts = param_counts(model)
    log(f"params {counts}")
    stats = train(model, train_ids, args, log)
    log(f"trained: {stats}")
    n_eval, ppl = heldout_ppl(model, held_ids, args)
    log(f"held-out perplexity {ppl:.2f} over {n_eval} tokens")
    rows = samples(model, tok, args)
    for r in rows:
        log(f"greedy: {r['greedy']!r}")
        log(f"t0.8:   {r['t0.8']!r}")

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    model.generation_config.bos_token_id = EOT
    model.generation_config.eos_token_id = [EOT, IM_END]
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(args.out)
    save_tokenizer(tok, args.out)

    sys.path.insert(0, str(REPO))  # run as a script from anywhere
    from formats.convert import ConvertOptions, convert, open_source

    args.emoe.parent.mkdir(parents=True, exist_ok=True)
    with open_source(args.out) as src:
        convert(src, args.emoe, ConvertOptions(dense="bf16", experts="int8", progress=False))
    size = args.emoe.stat().st_size
    log(f"wrote {args.emoe} ({size / 1e6:.2f} MB)")

    report = {
        "shape": {
            "model_type": "qwen3_moe",
            "vocab": args.vocab,
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "kv_heads": args.kv_heads,
            "experts": args.experts,
            "top_k": args.top_k,
            "expert_width": args.expert_width,
            "seq": args.seq,
            "batch": args.batch,
        },
        "params": counts,
        "data": {
            "packages": list(PACKAGES),
            "documents": len(docs),
            "heldout_every": args.heldout_every,
            "heldout_documents": len(held_docs),
            "train_tokens_available": int(len(train_ids)),
        },
        "dtype": args.dtype,
        "lr": args.lr,
        "training": stats,
        "heldout": {"tokens": n_eval, "perplexity": round(ppl, 3)},
        "samples": rows,
        "emoe": {
            "path": str(args.emoe.relative_to(REPO))
            if args.emoe.is_relative_to(REPO)
            else str(args.emoe),
            "bytes": size,
            "dense": "bf16",
            "experts": "int8",
        },
        "machine": machine(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "total_wall_s": round(time.time() - t_start, 1),
        "command": shlex.join(["python", "tools/train_demo.py", *(argv or sys.argv[1:])]),
    }
    report_path = args.report or args.emoe.parent / "TRAINING.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    write_readme(report_path.parent / "README.md", report)
    log(f"wrote {report_path} and README.md")
    if size > args.max_mb * 1e6:
        print(f"{args.emoe} is {size / 1e6:.1f} MB, over --max-mb {args.max_mb}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
