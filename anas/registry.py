"""A name-to-object table for each pluggable family (operations, losses, datasets, extractors)."""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from anas.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one family, looked up by name; configs and genotypes store only the names."""

    def __init__(self, family: str):
        self.family = family
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorate a factory or class to add it under `name`; names must be unique."""

        def add(entry: T) -> T:
            self.add(name, entry)
            return entry

        return add

    def add(self, name: str, entry: T) -> None:
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"invalid {self.family} name {name!r}: use letters, digits, _ and -")
        if name in self._entries:
            raise ValueError(f"{self.family} {name!r} is already registered")
        self._entries[name] = entry

    def get(self, name: str, key: str | None = None) -> T:
        """Return the entry called `name`; `key` is the config key or field to name in errors."""
        if name not in self._entries:
            where = f"{key}: " if key else ""
            raise ConfigError(
                f"{where}unknown {self.family} {name!r}; expected one of {', '.join(self.names())}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
