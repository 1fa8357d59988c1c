"""Which values enter and leave a contiguous run of segments, and which output replaces which
input (the token streams a block updates: the image stream, and the text stream in MMDiT)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graph import DiTGraph


@dataclass(frozen=True)
class SpanIO:
    inputs: tuple[str, ...]  # values the span reads from before it
    outputs: tuple[str, ...]  # values the span produces that are read after it
    pairs: tuple[tuple[str, str], ...]  # (input, output): output is the updated input stream
    unpaired: tuple[str, ...]  # outputs with no input of the same shape (forecast as values)
    primary_input: str  # the image stream (the largest paired tensor); "" when nothing is paired
    primary_output: str


def value_shapes(graph: DiTGraph) -> dict[str, tuple[int, ...]]:
    """Shape of every value that crosses a segment boundary, by environment name."""
    cached = graph.meta.get("_value_shapes")
    if cached is not None:
        return cached
    shapes: dict[str, tuple[int, ...]] = {}
    for seg in graph.segments:
        for node in seg.module.graph.nodes:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                shapes.setdefault(node.name, tuple(val.shape))
    graph.meta["_value_shapes"] = shapes
    return shapes


def span_io(graph: DiTGraph, names: tuple[str, ...]) -> SpanIO:
    segs = [graph.segment(n) for n in names]
    inside = set(names)
    produced: list[str] = []
    for s in segs:
        produced.extend(s.outputs)
    produced_set = set(produced)
    inputs: list[str] = []
    for s in segs:
        for i in s.inputs:
            if i not in produced_set and i not in inputs:
                inputs.append(i)
    needed_after: set[str] = set()
    after = False
    for s in graph.main_segments:
        if s.name in inside:
            after = True
            continue
        if after:
            needed_after.update(s.inputs)
    needed_after.update(o for o in graph.signature.outputs if isinstance(o, str))
    outputs = [o for o in produced if o in needed_after]
    shapes = value_shapes(graph)
    # An input that nothing after the span reads was consumed by it: the span replaced it.
    replaced = [i for i in inputs if i not in needed_after and i in shapes]
    pairs: list[tuple[str, str]] = []
    unpaired: list[str] = []
    free = list(replaced)
    for o in outputs:
        match = [i for i in free if shapes.get(i) == shapes.get(o)]
        if match:
            pairs.append((match[0], o))
            free.remove(match[0])
        else:
            unpaired.append(o)
    if not outputs:
        raise ValueError(f"span {names} produces nothing that is read after it")

    def numel(name: str) -> int:
        n = 1
        for d in shapes.get(name, ()):
            n *= d
        return n

    # A span that ends the model (e.g. blocks + epilogue) has no stream to pair: its output is
    # forecast as a value, and there is no primary input.
    primary = max(pairs, key=lambda p: numel(p[1])) if pairs else ("", unpaired[0])
    return SpanIO(tuple(inputs), tuple(outputs), tuple(pairs), tuple(unpaired), primary[0], primary[1])
