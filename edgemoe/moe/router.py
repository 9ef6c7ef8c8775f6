"""Routers: router logits -> (expert ids, combine weights) per token.

Shape legend: T tokens, E experts, K active experts per token, G groups.
All routing runs in float32, as the reference implementations do.
"""

from __future__ import annotations

import torch


def softmax_topk(
    logits: torch.Tensor, k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, keep the top k, optionally renormalise them to sum 1.

    Mixtral (normalize=True), Qwen2/3-MoE and OLMoE (normalize=norm_topk_prob).

    Args:
        logits: [T, E] router logits.
    Returns:
        ids [T, K] int64, weights [T, K] float32.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    w, ids = torch.topk(probs, k, dim=-1)  # [T, K]
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return ids, w


def group_limited_softmax_topk(
    logits: torch.Tensor, k: int, n_group: int, topk_group: int, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2: softmax over all experts, top k within the best topk_group groups.

    Experts are split into n_group equal groups; a group's score is its best
    expert's probability. Experts outside the kept groups get probability 0
    (not -inf, as transformers does), and the kept weights are the plain
    probabilities times scale (routed_scaling_factor), never renormalised.
    n_group=1 is DeepSeek's "greedy" method.

    Shape legend: T tokens, E experts, K active, G groups.

    Args:
        logits: [T, E] router logits.
        k: experts per token.
        n_group: G, which must divide E.
        topk_group: groups kept per token.
        scale: routed_scaling_factor.
    Returns:
        ids [T, K] int64, weights [T, K] float32.
    Raises:
        ValueError: G does not divide E.
    """
    t, e = logits.shape
    if e % n_group:
        raise ValueError(f"{e} experts do not split into {n_group} equal groups")
    scores = torch.softmax(logits.float(), dim=-1)  # [T, E]
    if n_group > 1:
        group_scores = scores.view(t, n_group, e // n_group).amax(dim=-1)  # [T, G]
        scores = scores.masked_fill(~_group_mask(group_scores, topk_group, e), 0.0)  # [T, E]
    w, ids = torch.topk(scores, k, dim=-1)  # [T, K]
    return ids, w * scale


def sigmoid_group_topk(
    logits: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    normalize: bool,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 ("noaux_tc"): sigmoid scores, bias-corrected group-limited choice.

    The correction bias steers which experts are chosen only: a group scores
    the sum of its best two biased scores, the best topk_group groups are
    kept, the top k biased scores in them are chosen, and their weights are
    the unbiased sigmoid scores (renormalised when normalize), times scale.

    Shape legend: T tokens, E experts, K active, G groups.

    Args:
        logits: [T, E] router logits.
        bias: [E] e_score_correction_bias.
        k: experts per token.
        n_group: G, which must divide E.
        topk_group: groups kept per token.
        normalize: norm_topk_prob.
        scale: routed_scaling_factor.
    Returns:
        ids [T, K] int64, weights [T, K] float32.
    Raises:
        ValueError: G does not divide E.
    """
    t, e = logits.shape
    if e % n_group:
        raise ValueError(f"{e} experts do not split into {n_group} equal groups")
    scores = torch.sigmoid(logits.float())  # [T, E]
    choice = scores + bias.float()  # [T, E]
    per_group = e // n_group
    group_scores = (
        choice.view(t, n_group, per_group).topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    )  # [T, G]
    choice = choice.masked_fill(~_group_mask(group_scores, topk_group, e), float("-inf"))
    ids = torch.topk(choice, k, dim=-1).indices  # [T, K]
    w = scores.gather(1, ids)  # [T, K]
    if normalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, w * scale


def _group_mask(group_scores: torch.Tensor, topk_group: int, e: int) -> torch.Tensor:
    """[T, G] group scores -> [T, E] bool, True for experts of the topk_group best groups."""
    t, g = group_scores.shape
    keep = torch.topk(group_scores, topk_group, dim=-1).indices  # [T, topk_group]
    mask = torch.zeros(t, g, dtype=torch.bool, device=keep.device).scatter_(1, keep, True)  # [T, G]
    return mask.repeat_interleave(e // g, dim=1)  # [T, E]
