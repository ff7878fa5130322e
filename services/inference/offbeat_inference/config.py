"""Configuration of the inference service: the `[inference]` section of the run TOML.

The model itself (path, dtype, context length) is the shared `[model]` section; this section says
how it is served: which engine, how many sequences at once, defaults for requests that leave a
sampling field unset, and where fetched weights are kept.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field

from offbeat.config import ServiceConfig


def default_replica() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class InferenceConfig(ServiceConfig):
    """The `[inference]` section."""

    engine: Literal["transformers", "vllm"] = "transformers"
    """`transformers`: continuous batching in-process (CPU, tests, machines without vLLM);
    `vllm`: `AsyncLLM` (needs the `offbeat-inference[vllm]` extra)."""
    max_batch: int = Field(64, ge=1, le=4096)
    """Engine capacity: sequences decoded together; more wait in the engine's queue."""
    max_requests_in_flight: int = Field(0, ge=0)
    """Rollout requests held from the bus at once (each has n samples); 0 means 2 x `max_batch`,
    so the engine has waiting work to admit the moment a slot frees."""
    max_new_tokens: int = Field(512, ge=1)
    """Completion length for requests whose `sampling.max_tokens` is 0."""
    max_model_len: int | None = Field(None, ge=16, le=131072)
    """Longest prompt plus completion in tokens; unset means `[model] max_model_len`."""
    max_prefill_tokens: int = Field(16384, ge=16)
    """Prompt tokens admitted in one prefill pass (transformers engine), bounding its memory."""
    device: str = "cpu"
    """Torch device of the transformers engine (`cpu`, `cuda`, `cuda:1`)."""
    torch_threads: int = Field(0, ge=0)
    """Intra-op threads for torch on CPU; 0 keeps torch's default."""
    replica: str = Field(default_factory=default_replica)
    """This replica's name in PolicyLive and completions."""
    weights_dir: str = ""
    """Where weights fetched from a `nats://` store are written; empty means
    `<run.state_dir>/inference/<replica>/weights`."""
    heartbeat_s: float = Field(10.0, gt=0)
    """How often a request still generating tells the bus it is in progress (extends `ack_wait`);
    capped at a third of `[bus] ack_wait_s`."""
    head_poll_s: float = Field(5.0, gt=0)
    """How often the policy head is read from KV again, to apply a version whose announcement
    was missed (published while this replica was disconnected from NATS)."""
    paused_nak_delay_s: float = Field(1.0, gt=0)
    """A request delivered just as a pause began goes back to the queue with this delay."""
    vllm_gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """vLLM: share of accelerator memory for weights and KV cache (ignored on CPU)."""
    vllm_kv_cache_gib: int = Field(1, ge=1)
    """vLLM on CPU: KV cache size (sets `VLLM_CPU_KVCACHE_SPACE`)."""
    vllm_enforce_eager: bool = True
    """vLLM: skip CUDA graphs / compilation (required on the CPU backend, faster start)."""
