"""The one error class of checkpoint and tokenizer files: what is wrong, naming the file and the tensor."""

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that does not match the configuration or is damaged: missing, misshapen, mistyped, unexpected
    or non-finite tensors, truncated shards, a broken index, a missing or corrupted file."""


def require_directory(path: str | Path) -> Path:
    """path as a Path, or a CheckpointError saying whether it is missing or a file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} " + (
            "is a file: give the directory that holds it" if path.exists() else "does not exist"))
    return path
