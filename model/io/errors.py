"""The one error class of checkpoint and tokenizer files: what is wrong, naming the file and the tensor."""


class CheckpointError(ValueError):
    """A checkpoint that does not match the configuration or is damaged: missing, misshapen, mistyped, unexpected
    or non-finite tensors, truncated shards, a broken index, a missing or corrupted file."""
