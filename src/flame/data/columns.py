"""The table `data.read_csv()` returns: a dict of numpy columns whose missing-column error
names the column, the columns there are and the closest one (names only, never values)."""

from __future__ import annotations

from typing import Any, NoReturn

from flame.errors import ColumnNotFound
from flame.utils.hints import did_you_mean, name_list

__all__ = ["Columns"]


class Columns(dict[str, Any]):
    """`{column name: numpy array}`; `table["nope"]` raises `ColumnNotFound` (a KeyError)."""

    def __missing__(self, key: object) -> NoReturn:
        hint = did_you_mean(key, self) if isinstance(key, str) else ""
        raise ColumnNotFound(
            key,
            f"no column {str(key)[:64]!r} in this table{hint}; its columns: {name_list(self)}",
        )
