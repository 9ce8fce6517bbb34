"""Configuration of one engine (one model), frozen and validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    """How an :class:`~edgellm.engine.engine.LLMEngine` runs its model.

    - ``block_size``: tokens per KV block (16, vLLM's default; the KV index must use the same).
    - ``kv_cache_bytes``: the byte budget of the block pool (K and V of every layer); the pool
      holds ``kv_cache_bytes // bytes_per_block`` blocks.
    - ``prefill_chunk``: prompt tokens computed per engine step, over all requests: a long
      prompt is cut into chunks, so running streams wait at most one chunk per token.
    - ``max_num_seqs``: requests running at once (decoding or prefilling); more wait.
    - ``max_waiting``: requests queued beyond those; more are refused (the caller answers
      "busy").
    - ``max_model_len``: context limit (prompt + generated); None = the model's own.
    - ``dtype``: ``float32`` (exact) or ``bfloat16`` (faster batches where the CPU has it).
    - ``threads``: PyTorch intra-op threads of the process (None: leave as is).
    - ``cache_root``: where converted models live (None: :func:`edgellm.models.cache.cache_root`).
    """

    block_size: int = 16
    kv_cache_bytes: int = 512 << 20
    prefill_chunk: int = 256
    max_num_seqs: int = 16
    max_waiting: int = 256
    max_model_len: int | None = None
    dtype: str = "float32"
    threads: int | None = None
    cache_root: str | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "kv_cache_bytes", "prefill_chunk", "max_num_seqs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.max_waiting, bool) or not isinstance(self.max_waiting, int) \
                or self.max_waiting < 0:
            raise ValueError(f"max_waiting must be an int >= 0, got {self.max_waiting!r}")
        if self.max_model_len is not None and (
            isinstance(self.max_model_len, bool) or not isinstance(self.max_model_len, int)
            or self.max_model_len < 2
        ):
            raise ValueError(f"max_model_len must be an int >= 2, got {self.max_model_len!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"threads must be an int >= 1, got {self.threads!r}")
