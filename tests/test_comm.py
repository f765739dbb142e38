"""Collectives go through hrvit/parallel/comm.py only, which puts their tensors where the backend takes them.

A CPU tensor handed to an NCCL group fails at run time on GPUs only ("No backend type associated
with device type cpu"), which no CPU test can see; so this test reads the source instead: any call
of a torch.distributed or deepspeed.comm collective outside comm.py fails it.
"""

import ast
from pathlib import Path

import pytest
from conftest import REPO

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_to_all",
               "all_to_all_single", "broadcast", "broadcast_object_list", "barrier", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list", "send",
               "recv", "isend", "irecv", "batch_isend_irecv", "monitored_barrier", "inference_all_reduce"}
COMM_MODULES = ("torch.distributed", "deepspeed.comm")
ALLOWED = {Path("hrvit/parallel/comm.py")}


def direct_collectives(source: str) -> list[tuple[int, str]]:
    """(line, call) of every collective called on torch.distributed / deepspeed.comm or imported from them."""
    tree = ast.parse(source)
    aliases = {}  # local name -> module it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if node.module.startswith(COMM_MODULES) and a.name in COLLECTIVES:
                    found.append((node.lineno, f"from {node.module} import {a.name}"))
                aliases[a.asname or a.name] = full

    def dotted(expr) -> str | None:
        if isinstance(expr, ast.Name):
            return aliases.get(expr.id, expr.id)
        if isinstance(expr, ast.Attribute):
            base = dotted(expr.value)
            return f"{base}.{expr.attr}" if base else None
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            base = dotted(node.func.value)
            if base and base.startswith(COMM_MODULES):
                found.append((node.lineno, f"{base}.{node.func.attr}"))
    return found


def test_the_scanner_finds_each_way_of_calling_a_collective():
    planted = ("import torch\nimport torch.distributed as dist\nfrom deepspeed import comm as ds\n"
               "from torch.distributed import barrier\n"
               "dist.all_reduce(t)\ntorch.distributed.all_gather(a, b)\nds.all_to_all_single(x, y)\n"
               "comm.all_reduce(t)\nnp.gather(x)\n")
    assert [call for _, call in direct_collectives(planted)] == [
        "from torch.distributed import barrier", "torch.distributed.all_reduce", "torch.distributed.all_gather",
        "deepspeed.comm.all_to_all_single"]


@pytest.mark.parametrize("folder", ["hrvit", "tools"])
def test_no_collective_is_called_outside_the_comm_module(folder):
    offences = [f"{path.relative_to(REPO)}:{line}: {call}"
                for path in sorted((REPO / folder).rglob("*.py")) if path.relative_to(REPO) not in ALLOWED
                for line, call in direct_collectives(path.read_text())]
    assert not offences, "call these through hrvit.parallel.comm instead:\n" + "\n".join(offences)
