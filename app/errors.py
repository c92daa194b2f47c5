"""What the command line and the web UI both recognise in the errors they turn into one readable line."""

from __future__ import annotations

#: What torch's RuntimeErrors say when an allocation fails: CUDA's OutOfMemoryError, the CPU allocator (Linux,
#: Windows), cuBLAS's workspace.
OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory", "ALLOC_FAILED")


def is_out_of_memory(err: BaseException) -> bool:
    """numpy's ``MemoryError``, or a RuntimeError of torch's that says an allocation failed."""
    return isinstance(err, MemoryError) or any(text in str(err) for text in OUT_OF_MEMORY_MESSAGES)
