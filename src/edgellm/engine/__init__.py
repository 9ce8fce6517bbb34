"""A local model on the CPU: transformers + PyTorch under our own scheduling (vLLM v1 roles).

- :mod:`~edgellm.engine.engine`: :class:`LLMEngine`, the step loop and its public API;
- :mod:`~edgellm.engine.scheduler`: chunked prefill, batched decode, admission, preemption;
- :mod:`~edgellm.engine.block_pool`: the shared block prefix cache and its KV events;
- :mod:`~edgellm.engine.block_hash`: vLLM's ``sha256_cbor`` block hash chain;
- :mod:`~edgellm.engine.kv_cache`: the KV tensors and the paged attention;
- :mod:`~edgellm.engine.model_runner`: one forward pass; :mod:`~edgellm.engine.sampler`;
- :mod:`~edgellm.engine.request`: a request's state, text and stop rules;
- :mod:`~edgellm.engine.loader`: Hugging Face directories and GGUF files (converted once).

Knows nothing of StackFlow or HTTP: the ``llm`` unit and the benches drive it. Importing
this package needs PyTorch (the ``llm`` extra).
"""

from edgellm.engine.config import EngineConfig
from edgellm.engine.engine import EngineBusy, EngineRequestError, EngineStats, LLMEngine
from edgellm.engine.loader import ModelLoadError
from edgellm.engine.request import RequestOutput
from edgellm.engine.sampling import SamplingError, SamplingParams

__all__ = [
    "EngineBusy",
    "EngineConfig",
    "EngineRequestError",
    "EngineStats",
    "LLMEngine",
    "ModelLoadError",
    "RequestOutput",
    "SamplingError",
    "SamplingParams",
]
