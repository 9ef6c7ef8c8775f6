"""Is a model's config consistent with its tensors? One validator for .emoe files and checkpoints.

The reader checks a file's container (offsets, checksums, codecs); this module
checks the model inside it, from the header alone: every config value the
runtime reads has the right type and range, the values agree with each other
(experts per token <= experts, heads that divide), and every tensor the
runtime will look up exists with the shape the config implies. The rules are
data per family (formats/model_rules.py). The runtime
calls it when it opens a file (EmoeReader(path, check_model=True)), the
converter before it writes anything; the tokenizer and chat template checks
here are run by the converter, by `edgemoe verify`, and by the runtime's
tokenizer on first use.

Shape legend: D hidden, V vocabulary, H heads, Hkv key/value heads, Dh head
dim, E routed experts, K experts per token, W expert width, I dense MLP
width, S shared expert width; MLA: Q q_lora_rank, C kv_lora_rank, N
qk_nope_head_dim, R qk_rope_head_dim, Dv v_head_dim.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from types import SimpleNamespace

from formats.errors import (
    BadConfig,
    BadTokenizer,
    EmoeError,
    ExpertTableMismatch,
    MissingTensor,
    ShapeMismatch,
    UnsupportedArchitecture,
)
from formats.model_rules import (
    DENSE_MLP,
    FAMILIES,
    GLOBAL,
    INT,
    NORMS,
    REQUIRED,
    RULES,
    FamilyRules,
    Key,
)

MAX_DIM = 2**31  # any size or count in a config; a larger one is a corrupt value, not a model
EXPERT_ROLES = ("gate", "up", "down")


class _Context:
    """Where the model came from: wording and the fix in every message."""

    def __init__(self, where: str):
        self.file = where != "checkpoint"
        self.cfg = "the file's config" if self.file else "config.json"
        self.fix_config = (
            "the file's config is inconsistent; re-convert the model from its own config.json "
            "with `edgemoe convert`"
            if self.file
            else "config.json does not match the model; use the model's own config.json"
        )
        self.fix_tensors = (
            "the file's tensors and config disagree; re-convert the model with `edgemoe convert`"
            if self.file
            else "the checkpoint does not match its config.json; check that both come from the same model"
        )

    def bad(self, what: str) -> BadConfig:
        return BadConfig(f"{self.cfg}: {what}", self.fix_config)


# ---- config values


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _value(cfg: Mapping, name: str, key: Key, ctx: _Context):
    present = name in cfg and cfg[name] is not None
    if not present and key.kind in ("int?",) and name in cfg:
        return None  # an explicit null that means something
    if not present:
        if key.default is REQUIRED:
            raise ctx.bad(f"{name!r} is missing")
        return key.default
    v = cfg[name]
    kind = key.kind.rstrip("?")
    expect = {
        "int": "an integer",
        "num": "a finite number",
        "bool": "true or false",
        "str": "a string",
        "ints": "a list of integers",
        "map": "a map",
    }[kind]
    ok = {
        "int": _is_int(v),
        "num": _is_num(v),
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
        "ints": isinstance(v, list) and all(_is_int(x) and 0 <= x < MAX_DIM for x in v),
        "map": isinstance(v, dict),
    }[kind]
    if not ok:
        raise ctx.bad(f"{name!r} is {v!r}, expected {expect}")
    if kind in ("int", "num"):
        too_big = kind == "int" and v >= MAX_DIM
        if v < key.lo or (key.gt and v == key.lo) or too_big:
            bound = f"more than {key.lo}" if key.gt else f"at least {key.lo}"
            if kind == "int":
                bound += f" and less than {MAX_DIM}"
            raise ctx.bad(f"{name!r} is {v!r}, expected {bound}")
    if key.choices and v not in key.choices:
        raise ctx.bad(f"{name!r} is {v!r}, this runtime supports {list(key.choices)}")
    return v


def _experts_value(cfg: Mapping, rules: FamilyRules, ctx: _Context) -> tuple[str, int]:
    """(the key that holds it, the number of routed experts)."""
    for name in rules.experts_keys:
        if cfg.get(name) is not None:
            return name, _value(cfg, name, INT, ctx)
    name = rules.experts_keys[0]
    default = rules.keys[name].default if name in rules.keys else REQUIRED
    if default is REQUIRED:
        raise ctx.bad(f"{name!r} (the number of routed experts) is missing")
    return name, default


def _rope(cfg: Mapping, rules: FamilyRules, ctx: _Context) -> None:
    """rope_theta (either key) and, for DeepSeek, the scaling its model supports (plain or yarn)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        _value(params, "rope_theta", Key("num", lo=0, gt=True), _Sub(ctx, "rope_parameters"))
    if not rules.mla:
        return
    for name in ("rope_parameters", "rope_scaling"):
        p = cfg.get(name)
        if not isinstance(p, dict):
            continue
        sub = _Sub(ctx, name)
        kind = p.get("rope_type") or p.get("type") or "default"
        if kind not in ("default", "yarn"):
            raise ctx.bad(
                f"{name} type {kind!r} is not supported; edgemoe runs plain rope and 'yarn'"
            )
        for k in ("factor", "mscale", "mscale_all_dim", "attention_factor"):
            if p.get(k) is not None:
                _value(p, k, Key("num", lo=0), sub)
        for k in ("beta_fast", "beta_slow"):
            if p.get(k) is not None:
                _value(p, k, Key("num", lo=0, gt=True), sub)
        if p.get("original_max_position_embeddings") is not None:
            _value(p, "original_max_position_embeddings", INT, sub)


class _Sub(_Context):
    """A context for keys inside a map (rope_scaling.factor)."""

    def __init__(self, parent: _Context, prefix: str):
        self.__dict__.update(parent.__dict__)
        self.cfg = f"{parent.cfg}: {prefix}"


def dims(family: str, cfg: Mapping, where: str = "file") -> SimpleNamespace:
    """The sizes a family's runtime derives from a config, every value checked.

    Raises:
        UnsupportedArchitecture: an unknown family.
        BadConfig: a value is missing, of the wrong type, out of range, or contradicts another.
    """
    rules = RULES.get(family)
    if rules is None:
        raise UnsupportedArchitecture(
            f"model family {family!r} is not one the runtime knows",
            f"edgemoe runs {', '.join(RULES)}; convert one of those",
        )
    ctx = _Context(where)
    if not isinstance(cfg, Mapping):
        raise ctx.bad("it is not a map")
    v = {name: _value(cfg, name, key, ctx) for name, key in rules.keys.items()}
    _rope(cfg, rules, ctx)
    eos = cfg.get("eos_token_id")
    if eos is not None and not (
        (_is_int(eos) and eos >= 0)
        or (isinstance(eos, list) and all(_is_int(x) and x >= 0 for x in eos))
    ):
        raise ctx.bad(f"'eos_token_id' is {eos!r}, expected a token id or a list of them")
    d = SimpleNamespace(
        family=family,
        D=v["hidden_size"],
        V=v["vocab_size"],
        L=v["num_hidden_layers"],
        H=v["num_attention_heads"],
        K=v["num_experts_per_tok"],
        v=v,
    )
    d.experts_key, d.E = _experts_value(cfg, rules, ctx)
    if d.K > d.E:
        raise ctx.bad(f"'num_experts_per_tok' is {d.K} but {d.experts_key!r} is {d.E}")
    if rules.width_key in v:
        d.W = v[rules.width_key]
    else:
        d.W = _value(cfg, rules.width_key, INT, ctx)
    if d.W < 1:
        raise ctx.bad(
            f"{rules.width_key!r} (the routed experts' width) is {d.W}, expected at least 1"
        )
    d.I = v.get("intermediate_size", 0)
    if rules.mla:
        _mla_dims(d, v, ctx)
    else:
        _gqa_dims(d, v, ctx)
    return d


def _gqa_dims(d, v, ctx: _Context) -> None:
    d.Hkv = v["num_key_value_heads"] or d.H
    d.Dh = v["head_dim"] or d.D // d.H
    if d.Dh < 1:
        raise ctx.bad(f"'num_attention_heads' {d.H} exceeds 'hidden_size' {d.D}")
    if d.Hkv > d.H or d.H % d.Hkv:
        raise ctx.bad(
            f"'num_attention_heads' {d.H} is not a multiple of 'num_key_value_heads' {d.Hkv}"
        )
    if d.Dh % 2:
        raise ctx.bad(f"the head dimension {d.Dh} is odd; rotary embeddings need an even one")
    d.S = v.get("shared_expert_intermediate_size", 0)
    step, dense = v.get("decoder_sparse_step", 1), set(v.get("mlp_only_layers", ()))
    if d.family in ("qwen2_moe", "qwen3_moe"):
        d.sparse = lambda i: i not in dense and (i + 1) % step == 0
    else:
        d.sparse = lambda i: True


def _mla_dims(d, v, ctx: _Context) -> None:
    d.Q, d.C = v["q_lora_rank"], v["kv_lora_rank"]
    d.N, d.R, d.Dv = v["qk_nope_head_dim"], v["qk_rope_head_dim"], v["v_head_dim"]
    d.S = v["n_shared_experts"] * d.W
    if d.R % 2:
        raise ctx.bad(f"'qk_rope_head_dim' is {d.R}; rotary embeddings need an even one")
    group = d.family == "deepseek_v3" or v["topk_method"] == "group_limited_greedy"
    if group:
        g, tg = v["n_group"], v["topk_group"]
        if d.E % g:
            raise ctx.bad(f"{d.E} routed experts do not split into 'n_group' {g} equal groups")
        if tg > g:
            raise ctx.bad(f"'topk_group' {tg} exceeds 'n_group' {g}")
    first, freq = v["first_k_dense_replace"], v["moe_layer_freq"]
    d.sparse = lambda i: i >= first and i % freq == 0


# ---- tensors


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_model(
    family: str,
    config: Mapping,
    shapes: Mapping[str, tuple],
    experts: Mapping[tuple[int, int], Mapping[str, str]],
    where: str = "file",
) -> SimpleNamespace:
    """Check a model's config against its tensors, as its family's runtime will read them.

    Args:
        family: the model_type.
        config: the config map.
        shapes: every tensor's shape by Hugging Face name.
        experts: (layer, expert) -> {"gate"|"up"|"down": tensor name}, the routed experts.
        where: "file" (a .emoe) or "checkpoint" (a conversion's input): the wording and fix.
    Returns:
        The derived sizes (see `dims`).
    Raises:
        BadConfig, ExpertTableMismatch, MissingTensor, ShapeMismatch, UnsupportedArchitecture:
            the first inconsistency, naming the key or tensor.
    """
    ctx = _Context(where)
    d = dims(family, config, where)
    rules = RULES[family]
    has_layer = {int(m.group(1)) for n in shapes if (m := _LAYER.match(n))}
    has_layer |= {layer for layer, _ in experts}
    if d.L > len(has_layer) or any(i not in has_layer for i in range(d.L)):
        missing = next(i for i in range(d.L) if i not in has_layer)
        raise ctx.bad(f"'num_hidden_layers' is {d.L}, but there are no tensors for layer {missing}")
    _check_expert_table(d, experts, rules, ctx)
    for name, shape_of, need in GLOBAL:
        _check_tensor(name, shape_of, need, d, shapes, lambda n: n in shapes, ctx)
    for i in range(d.L):
        prefix = f"model.layers.{i}."
        table = NORMS + rules.attention
        if d.sparse(i):
            table = table + rules.moe
        else:
            if d.I < 1:
                raise ctx.bad(f"layer {i} is a dense layer but 'intermediate_size' is {d.I}")
            table = table + DENSE_MLP

        def has(n, p=prefix):
            return p + n in shapes

        for name, shape_of, need in table:
            _check_tensor(prefix + name, shape_of, need, d, shapes, has, ctx, short=name)
    want = {"gate": (d.W, d.D), "up": (d.W, d.D), "down": (d.D, d.W)}
    for (layer, e), roles in experts.items():
        for role in EXPERT_ROLES:
            name = roles[role]
            if name not in shapes:
                raise MissingTensor(f"expert {e} of layer {layer}: tensor {name!r} is missing")
            if tuple(shapes[name]) != want[role]:
                raise ShapeMismatch(
                    f"{name} (expert {e} of layer {layer}, {role}): shape {list(shapes[name])}, "
                    f"{ctx.cfg} implies {list(want[role])} "
                    f"({rules.width_key}={d.W}, hidden_size={d.D})",
                    ctx.fix_tensors,
                )
    return d


def _check_expert_table(d, experts, rules: FamilyRules, ctx: _Context) -> None:
    per_layer: dict[int, set[int]] = {}
    for layer, e in experts:
        per_layer.setdefault(layer, set()).add(e)
    fix = ctx.fix_tensors
    for layer in sorted(per_layer):
        if layer >= d.L or not d.sparse(layer):
            why = "beyond 'num_hidden_layers'" if layer >= d.L else "a dense layer in the config"
            raise ExpertTableMismatch(
                f"layer {layer} has {len(per_layer[layer])} routed experts but is {why}", fix
            )
    for i in range(d.L):
        if not d.sparse(i):
            continue
        got = per_layer.get(i, set())
        if len(got) != d.E or any(e not in got for e in range(d.E)):
            lacking = next((e for e in range(d.E) if e not in got), None)
            detail = f", expert {lacking} is missing" if lacking is not None else ""
            raise ExpertTableMismatch(
                f"{ctx.cfg} says {d.experts_key!r} = {d.E}, but layer {i} has {len(got)} routed experts{detail}",
                fix,
            )


def _check_tensor(name, shape_of, need, d, shapes, has, ctx: _Context, short=None) -> None:
    required = need(d, has) if callable(need) else need
    if name not in shapes:
        if required:
            where = "the file" if ctx.file else "the checkpoint"
            raise MissingTensor(
                f"tensor {name!r} is missing from {where}",
                ctx.fix_tensors if ctx.file else None,
            )
        return
    want = shape_of(d)
    got = tuple(shapes[name])
    if got != tuple(want):
        raise ShapeMismatch(
            f"{name}: shape {list(got)}, {ctx.cfg} implies {list(want)}{_explain(short or name, d)}",
            ctx.fix_tensors,
        )


def _explain(name: str, d) -> str:
    """The config values behind a tensor's expected shape, for the message."""
    if "embed" in name or "lm_head" in name:
        return f" (vocab_size={d.V}, hidden_size={d.D})"
    if name.startswith("self_attn") and hasattr(d, "Dh"):
        return f" (num_attention_heads={d.H}, num_key_value_heads={d.Hkv}, head_dim={d.Dh}, hidden_size={d.D})"
    if name.startswith("self_attn"):
        return (
            f" (num_attention_heads={d.H}, q_lora_rank={d.Q}, kv_lora_rank={d.C}, "
            f"qk_nope_head_dim={d.N}, qk_rope_head_dim={d.R}, v_head_dim={d.Dv})"
        )
    if name.startswith("mlp.gate"):
        return f" (routed experts={d.E}, hidden_size={d.D})"
    return f" (hidden_size={d.D})"


# ---- whole files and checkpoints


def check_file(reader) -> SimpleNamespace:
    """Check an open EmoeReader's model from its header (no chunk is read).

    Raises:
        BadConfig, ExpertTableMismatch, MissingTensor, ShapeMismatch, UnsupportedArchitecture.
    """
    from formats import constants as C

    ctx = _Context("file")
    meta = reader.metadata
    gen = meta.get(C.M_GENERATION_CONFIG)
    if gen is not None:
        if not isinstance(gen, dict):
            raise ctx.bad(f"the generation config is a {type(gen).__name__}, not a map")
        eos = gen.get("eos_token_id")
        if eos is not None and not (
            _is_int(eos) or (isinstance(eos, list) and all(_is_int(x) for x in eos))
        ):
            raise ctx.bad(f"generation config 'eos_token_id' is {eos!r}, expected token ids")
    tpl = meta.get(C.M_CHAT_TEMPLATE)
    if tpl is not None and not isinstance(tpl, str):
        raise ctx.bad(f"the chat template is a {type(tpl).__name__}, not text")
    shapes = {name: t.shape for name, t in reader.tensors.items()}
    experts = {key: e.tensors for key, e in reader.experts.items()}
    return check_model(reader.family, reader.config, shapes, experts, "file")


def check_tokenizer(blob: bytes | memoryview, vocab_size: int | None, where: str = "the file"):
    """Parse a tokenizer.json blob; its ids must fit the model's vocabulary.

    Returns:
        The tokenizers.Tokenizer.
    Raises:
        BadTokenizer: it is not UTF-8 JSON that Hugging Face tokenizers loads, or it has
            token ids the embedding has no row for.
    """
    from tokenizers import Tokenizer

    try:
        text = bytes(blob).decode("utf-8")
        tok = Tokenizer.from_str(text)
    except UnicodeDecodeError as e:
        raise BadTokenizer(
            f"the tokenizer.json in {where} is not UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    except Exception as e:  # tokenizers raises plain Exception for bad JSON or schema
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise BadTokenizer(f"the tokenizer.json in {where} does not load: {msg}") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and n > vocab_size:
        top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
        if top >= vocab_size:
            raise BadTokenizer(
                f"the tokenizer.json in {where} has token id {top}, but the model's "
                f"'vocab_size' is {vocab_size} (the embedding has no row for it)"
            )
    return tok


def check_checkpoint(source, experts: Mapping[tuple[int, int], Mapping[str, str]]) -> None:
    """Check a CheckpointSource before conversion writes anything: config vs tensors,
    the tokenizer, the chat template.

    Raises:
        BadConfig, ExpertTableMismatch, MissingTensor, ShapeMismatch, BadTokenizer,
        BadChatTemplate, UnsupportedArchitecture.
    """
    cfg = source.config
    shapes = {name: info.shape for name, info in source.tensors().items()}
    d = check_model(cfg.get("model_type"), cfg, shapes, experts, "checkpoint")
    if source.tokenizer_json:
        check_tokenizer(source.tokenizer_json, d.V, "the checkpoint")
    if source.chat_template is not None:
        from formats.chat_template import compile_template

        compile_template(source.chat_template, "the checkpoint's chat template")


__all__ = [
    "FAMILIES",
    "RULES",
    "EmoeError",
    "check_checkpoint",
    "check_file",
    "check_model",
    "check_tokenizer",
    "dims",
]
