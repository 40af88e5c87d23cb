"""Dynamo's graphs recorded as traced: which sizes a compile saw, static or dynamic. Apart from
conftest (which sets the thread count), so that a test's subprocess script can import it too."""

from __future__ import annotations

import pytest
import torch


def record_dynamo_graphs(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple]]:
    """torch.compile with a backend that runs Dynamo's graphs as traced (no Inductor compile, so
    fast) and records each graph's tensor input shapes, as traced: a dynamic size is a SymInt."""
    traced: list[list[tuple]] = []

    def recording_backend(graph: torch.fx.GraphModule, example_inputs: list):
        values = [node.meta.get("example_value") for node in graph.graph.nodes if node.op == "placeholder"]
        traced.append([tuple(value.shape) for value in values if isinstance(value, torch.Tensor)])
        return graph.forward

    compile_model = torch.compile

    def compile_with_recording_backend(module, *args, mode=None, **kwargs):
        return compile_model(module, *args, backend=recording_backend, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_with_recording_backend)
    return traced


def all_static(shapes: list[tuple]) -> bool:
    return all(type(size) is int for shape in shapes for size in shape)
