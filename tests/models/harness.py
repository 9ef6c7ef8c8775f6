"""Run a .emoe with edgemoe and its source folder with transformers, greedily.

The oracle for every family: the same weights, the same prompts, greedy
decoding; edgemoe must produce the same tokens, with logits close.
"""

from __future__ import annotations

import torch

from edgemoe.models import build_model, parse_args
from edgemoe.moe.executor import ResidentExecutor
from edgemoe.prepare import load_all_experts
from edgemoe.weights import ResidentWeights
from formats.reader import EmoeReader


def load_ours(path, dtype=torch.float32, level=None, fused=True):
    r = EmoeReader(path)
    w = ResidentWeights(r, dtype, fused)
    ex = ResidentExecutor(load_all_experts(r, dtype, level, fused))
    return build_model(r.family, parse_args(r.family, r.config), w, ex)


def greedy_ours(
    model, prompts: list[list[int]], n_new: int
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Batched greedy decoding (right padding, a KV slot per prompt); returns new tokens and
    per-step logits [B, V]."""
    b = len(prompts)
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(b, width, dtype=torch.int64)
    valid = torch.zeros(b, width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
        valid[i, : len(p)] = True
    cache = model.new_cache(b, width + n_new)
    h = model.forward(tokens, cache, valid)
    last = torch.tensor([len(p) - 1 for p in prompts])
    logits = model.logits(h[torch.arange(b), last])
    out, steps = [[] for _ in range(b)], []
    for _ in range(n_new):
        steps.append(logits)
        nxt = logits.argmax(-1)
        for i in range(b):
            out[i].append(int(nxt[i]))
        h = model.forward(nxt[:, None], cache)
        logits = model.logits(h[:, -1])
    return out, steps


def greedy_hf(hf_dir, prompt: list[int], n_new: int, dtype=torch.float32):
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    m.eval()
    with torch.no_grad():
        g = m.generate(
            torch.tensor([prompt]),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    return g.sequences[0, len(prompt) :].tolist(), [s[0].float() for s in g.logits]
