"""The row each target matrix is reported under: one role per row, named as briefly as the targets allow.

The last part of a name (`q_proj`) is PEFT's module type, but not a role: GPT-2's `attn.c_proj` and
`mlp.c_proj`, BERT's four `dense` layers, T5's encoder and decoder `q` share it. A role is a name with its
layer index dropped; its label is the shortest end of what follows the index that no other role ends
with (`q_proj`, `attn.c_proj`), headed, where stacks of layers hold the same role (T5's encoder and
decoder, Gemma 3's vision tower and language model), by the first parts that tell the stacks apart
(`encoder.SelfAttention.q`, `vision_tower.q_proj`).
"""

from __future__ import annotations

from collections.abc import Iterable

Parts = tuple[str, ...]


def role_labels(names: Iterable[str]) -> dict[str, str]:
    """The report row (qpissa_report.json's `module_type`) of each target, from the conversion's targets.

    Args:
        names: every target's module name (`model.layers.0.self_attn.q_proj`).

    Returns:
        `{name: label}`; targets share a label exactly when they play one role in different layers.
    """
    roles = {name: _role(name) for name in names}
    withins = {within for _, within in roles.values()}
    ends = {within: _shortest_unique(within, withins, from_end=True) for within in withins}
    stacks: dict[Parts, set[Parts]] = {}
    for stack, within in roles.values():
        stacks.setdefault(within, set()).add(stack)
    labels = {}
    for name, (stack, within) in roles.items():
        head = _stack_head(stack, stacks[within]) if len(stacks[within]) > 1 else ()
        labels[name] = ".".join(head + ends[within])
    return labels


def _role(name: str) -> tuple[Parts, Parts]:
    """`(stack, within)`: the parts before the layer index (the first number but the last part) and the
    parts after it with any further index dropped (T5's `layer.0`); no index: `((), every part)`."""
    parts = tuple(name.split("."))
    index = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
    if index is None:
        return (), parts
    inner = parts[index + 1 : -1]
    return parts[:index], (*(part for part in inner if not part.isdigit()), parts[-1])


def _shortest_unique(parts: Parts, others: set[Parts], *, from_end: bool) -> Parts:
    """The shortest end (or start) of `parts` that is the end (start) of no other of `others`, never a
    bare number; all of `parts` if every one is shared."""
    for size in range(1, len(parts) + 1):
        piece = parts[-size:] if from_end else parts[:size]
        if piece[0].isdigit():
            continue
        if not any(_has(other, piece, from_end) for other in others if other != parts):
            return piece
    return parts


def _has(parts: Parts, piece: Parts, from_end: bool) -> bool:
    return parts[len(parts) - len(piece) :] == piece if from_end else parts[: len(piece)] == piece


def _stack_head(stack: Parts, stacks: set[Parts]) -> Parts:
    """What tells `stack` apart from the other stacks holding the same role: the shortest start of what
    follows the parts they all begin with (`encoder` of `encoder.block` against `decoder.block`)."""
    common = 0
    while common < len(stack) and all(len(s) > common and s[common] == stack[common] for s in stacks):
        common += 1
    rests = {s[common:] for s in stacks}
    return _shortest_unique(stack[common:], rests, from_end=False)
