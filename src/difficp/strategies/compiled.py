"""Compiles the strategies' twins and generates the integer switches that call them (numba).

Imported only by :mod:`difficp.fused`, so the strategy modules stay free of numba.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

from numba import njit

_OPTIONS: dict[str, Any] = {"inline": "always", "error_model": "numpy"}


def compile_twin(twin: Callable) -> Callable:
    """``twin`` (plain Python on floats / numpy arrays) as an inlined numba function; the
    :func:`~difficp.strategies.registry.compiled_helper` functions it calls are compiled too."""
    helpers = {}
    for name in twin.__code__.co_names:
        value = twin.__globals__.get(name)
        if value is not None and getattr(value, "compiled_helper", False):
            helpers[name] = compile_twin(value)
    if helpers:
        namespace = {**twin.__globals__, **helpers}
        twin = types.FunctionType(
            twin.__code__, namespace, twin.__name__, twin.__defaults__, twin.__closure__
        )
    return njit(**_OPTIONS)(twin)


def switch(twins: Sequence[Callable | None], arity: int) -> Callable:
    """A numba function ``f(code, *args)`` (``arity`` arguments after the code) calling
    ``twins[code](*args)``: the dispatch of a registry's codes inside the compiled kernel.

    ``None`` entries (strategies without a twin, which ``fused_supported`` refuses) are never
    called; an unknown code falls to the last twin. Generated as source, because numba's
    closures cannot forward ``*args``.
    """
    args = ", ".join(f"a{i}" for i in range(arity))
    namespace: dict[str, Callable] = {}
    live = [(code, twin) for code, twin in enumerate(twins) if twin is not None]
    lines = [f"def dispatch(code, {args}):"]
    for position, (code, twin) in enumerate(live):
        namespace[f"twin{code}"] = compile_twin(twin)
        call = f"return twin{code}({args})"
        if position < len(live) - 1:
            lines += [f"    if code == {code}:", f"        {call}"]
        else:
            lines.append(f"    {call}")
    exec("\n".join(lines), namespace)  # trusted: built from the registries above
    return njit(**_OPTIONS)(namespace["dispatch"])
