"""A registry of named strategies: the one list a config option's allowed values, the compiled
kernel's integer codes and the parity tests are all read from.

Registration order is the code order: the compiled kernel (:mod:`difficp.fused`) dispatches on
``registry.code(name)``, so codes are generated, never kept by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def compiled_helper(function: Callable) -> Callable:
    """Marks a plain-Python function that compiled twins call: :mod:`difficp.fused` compiles it
    along with them (numba compiles only what it is given), so twins can share mathematics
    without this package importing numba."""
    function.compiled_helper = True  # type: ignore[attr-defined]
    return function


class Registry(Generic[T]):
    """Strategy instances by option name (``None`` may be a name: "no strategy").

    ``@REGISTRY.register("name")`` on a class registers one instance of it under ``name`` and
    sets its ``name`` attribute.
    """

    def __init__(self, option: str) -> None:
        self.option = option  # the ICPConfig field whose values these are
        self._items: dict[str | None, T] = {}

    def register(self, name: str | None) -> Callable[[type], type]:
        def add(cls: type) -> type:
            if name in self._items:
                raise ValueError(f"{self.option} {name!r} is registered twice")
            instance = cls()
            instance.name = name
            self._items[name] = instance
            return cls

        return add

    @property
    def names(self) -> tuple[str | None, ...]:
        """Every registered name, in code order."""
        return tuple(self._items)

    def __getitem__(self, name: str | None) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"ICPConfig.{self.option}={name!r} is not one of {self.names}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, (str, type(None))) and name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def code(self, name: str | None) -> int:
        """The integer code of ``name`` in the compiled kernel (its registration index)."""
        self[name]  # a clear error for an unknown name
        return self.names.index(name)
