"""A node's data: the `Data` handle analysts get, its readers (pyarrow) and sources/."""

from flame.data.handle import Data, FileSource, LocalSource, MemorySource, Table

__all__ = ["Data", "FileSource", "LocalSource", "MemorySource", "Table"]
