"""Opaque library modules rewritten as the plain ops they compute, right after tracing.

torch.fx keeps every ``torch.nn`` module as one call. For most that is what the passes
want (a Conv2d is a unit), but ``nn.MultiheadAttention`` hides its in/out projections,
heads and head size inside one call, so no pass can see into it. Here its self-attention
calls become the ops timm's attention is traced to: a linear on the packed q/k/v weight,
a reshape to (3, heads, head_dim), ``scaled_dot_product_attention`` and the output
projection (still a module call). The parameters stay where they were (same state-dict
names); :func:`surgery.graph.trace` checks the rewritten graph against the eager model.

A call is only rewritten where the rewrite computes the same thing in training too:
self-attention (query, key and value the same tensor), no masks, no bias_k/bias_v or
zero attention, no attention dropout, and the attention weights unused.
"""

from __future__ import annotations

import operator

import torch.nn.functional as F
from torch import fx, nn


def decompose(gm: fx.GraphModule) -> list[str]:
    """Rewrite the calls this module knows in place; returns what was rewritten, as 'name (Type)'."""
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if type(module) is nn.MultiheadAttention and _multihead_attention(gm, node, module):
            done.append(f"{node.target} (MultiheadAttention)")
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _call_args(node: fx.Node) -> dict[str, object]:
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    return args


def _multihead_attention(gm: fx.GraphModule, node: fx.Node, m: nn.MultiheadAttention) -> bool:
    args = _call_args(node)
    x = args.get("query")
    if not (isinstance(x, fx.Node) and args.get("key") is x and args.get("value") is x):
        return False  # cross-attention: q and k/v from different tensors
    if any(args.get(k) is not None for k in ("key_padding_mask", "attn_mask")) or args.get("is_causal"):
        return False
    if (not m._qkv_same_embed_dim or m.bias_k is not None or m.bias_v is not None or m.add_zero_attn
            or m.dropout != 0.0):
        return False
    outputs = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1)
               for u in outputs):
        return False
    if any(u.args[1] == 1 and u.users for u in outputs):
        return False  # the attention weights are used
    heads, embed = m.num_heads, m.embed_dim
    name = node.target
    g = gm.graph
    with g.inserting_before(node):
        tokens = x if m.batch_first else g.call_method("transpose", (x, 0, 1))
        batch = g.call_method("size", (tokens, 0))
        length = g.call_method("size", (tokens, 1))
        weight = g.get_attr(f"{name}.in_proj_weight")
        bias = g.get_attr(f"{name}.in_proj_bias") if m.in_proj_bias is not None else None
        qkv = g.call_function(F.linear, (tokens, weight, bias))
        qkv = g.call_method("reshape", (qkv, batch, length, 3, heads, embed // heads))
        qkv = g.call_method("permute", (qkv, 2, 0, 3, 1, 4))
        qkv = g.call_method("unbind", (qkv, 0))
        q, k, v = (g.call_function(operator.getitem, (qkv, i)) for i in range(3))
        attn = g.call_function(F.scaled_dot_product_attention, (q, k, v))
        attn = g.call_method("transpose", (attn, 1, 2))
        attn = g.call_method("reshape", (attn, batch, length, embed))
        out = g.call_module(f"{name}.out_proj", (attn,))
        if not m.batch_first:
            out = g.call_method("transpose", (out, 0, 1))
    for user in outputs:
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        g.erase_node(user)
    g.erase_node(node)
    return True
