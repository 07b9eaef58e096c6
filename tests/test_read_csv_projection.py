"""`data.read_csv(columns=[...])`: only the named columns are converted and kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from flame.data import Data, MemorySource
from flame.errors import DataError

CSV = "age,name,weight\n41,Ana,70.5\n52,Bo,NA\n"


@pytest.mark.parametrize("where", ["local", "memory"])
def test_projection_keeps_the_named_columns_in_order(tmp_path: Path, where: str) -> None:
    if where == "local":  # streamed into numpy
        (tmp_path / "r.csv").write_text(CSV)
        data = Data.from_path(tmp_path)
    else:  # the general reader
        data = Data({"m": MemorySource({"r.csv": CSV})})
    table = data.read_csv("r.csv", columns=["weight", "age"])
    assert list(table) == ["weight", "age"]
    assert table["age"].tolist() == [41.0, 52.0]
    assert table["weight"][0] == 70.5 and table["weight"][1] != table["weight"][1]  # NaN
    with pytest.raises(DataError, match="'height'"):
        data.read_csv("r.csv", columns=["height"])
