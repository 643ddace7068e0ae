"""Reading sharded (torch.distributed.checkpoint) checkpoints without running code from them.

torch's FileSystemReader reads `.metadata` with a plain `pickle.load`, and its DefaultLoadPlanner
reads every non-tensor entry (AdamW's lr, betas, ...) with weights_only off (full unpickling): a
checkpoint directory someone hands you could run any code on load. Here the metadata goes through
an unpickler that admits only DCP's own metadata types (plus torch.Size, dtypes, layouts and
paths), non-tensor entries go through `torch.load(weights_only=True)`, and the data files named by
the metadata must lie inside the checkpoint directory. `load(...)` is the one entry point for
every DCP read in nanomoe.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

METADATA_FILE = ".metadata"

# (module, name) pairs a DCP .metadata pickle may name; anything else is refused.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    (_DCP_METADATA, name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"), ("pathlib._local", "PosixPath"), ("pathlib._local", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of DCP's metadata")


def read_metadata(sharded_dir: str | Path):
    """The DCP Metadata of `sharded_dir`, read with the restricted unpickler; CheckpointError
    (naming the file) for anything else, including a pickle that would run code."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(sharded_dir) / METADATA_FILE
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the sharded checkpoint is incomplete") from None
    except Exception as e:  # UnpicklingError, EOFError, TypeError, ... from a damaged or foreign file
        raise CheckpointError(
            f"refusing to read {path}: {e}. It is not a sharded checkpoint written by nanomoe (a damaged "
            "or foreign file, possibly one made to run code); use another checkpoint"
        ) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"refusing to read {path}: it holds a {type(metadata).__name__}, not DCP metadata")
    for info in (metadata.storage_data or {}).values():
        relative = getattr(info, "relative_path", "")
        if not isinstance(relative, str) or Path(relative).name != relative or relative in ("", ".", ".."):
            raise CheckpointError(f"refusing to read {path}: it names a data file outside its directory ({relative!r})")
    return metadata


def _reader_and_planner(sharded_dir: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            if kwargs.get("rank") is not None:  # per-rank metadata files: nanomoe never writes them
                raise CheckpointError(f"{sharded_dir} holds per-rank metadata, which nanomoe does not read")
            metadata = read_metadata(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            loaded = torch.load(value, weights_only=True)  # numbers, strings, tuples: no objects
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeReader(sharded_dir), SafePlanner()


def load(state: dict[str, Any], sharded_dir: str | Path, *, no_dist: bool) -> None:
    """`torch.distributed.checkpoint.load(state, checkpoint_id=sharded_dir)` with the safe reader
    and planner: fills `state` in place."""
    import torch.distributed.checkpoint as dcp

    sharded_dir = Path(sharded_dir)
    read_metadata(sharded_dir)  # refuse before DCP starts (its errors are wrapped per rank)
    reader, planner = _reader_and_planner(sharded_dir)
    dcp.load(state, storage_reader=reader, planner=planner, no_dist=no_dist)
