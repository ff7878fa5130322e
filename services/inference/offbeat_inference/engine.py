"""The `Engine` seam: what the service needs from whatever samples the policy.

An engine takes one prompt (token ids) with sampling settings and returns one `Generation`: the
sampled token ids, the log-prob of each, why it stopped, and which policy version sampled each
token (as contiguous spans). It swaps in new weights between its decode steps without dropping
the sequences it holds.

Log-prob convention (both engines, and what the trainer's off-policy correction assumes): the
log-prob of a sampled token is taken from `log_softmax(logits / T)`, the temperature-scaled
distribution BEFORE top-k/top-p truncation; with T = 1 it is the plain model log-prob that a
teacher-forced forward pass gives. Greedy decoding (T = 0) reports `log_softmax(logits)`.

After an in-flight weight update the sequences in flight keep the KV cache computed by the old
weights; their later tokens are sampled by the new weights over that cache (as vLLM and
PipelineRL do) and carry the new version in their spans.

Not covered here: the bus, prompts as text or chat (the service renders and tokenizes them), and
fetching weight files (`offbeat_inference.updates`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offbeat import config
from offbeat.weights import ChunkDigests

MIN_TEMPERATURE = config.MIN_TEMPERATURE
"""`offbeat.config.MIN_TEMPERATURE`: the service refuses a request for less (but 0, greedy)."""


@dataclass(frozen=True)
class Sampling:
    """Per-sample settings; `seed` already includes the sample index (request seed + i)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"
    spans: list[tuple[int, int, int]]  # (version, start, end), end exclusive, contiguous
    started_at: float = 0.0
    finished_at: float = 0.0


def spans_from_versions(versions: list[int]) -> list[tuple[int, int, int]]:
    """Contiguous runs of equal versions: [5, 5, 6] -> [(5, 0, 2), (6, 2, 3)]."""
    spans: list[tuple[int, int, int]] = []
    for i, v in enumerate(versions):
        if spans and spans[-1][0] == v:
            spans[-1] = (v, spans[-1][1], i + 1)
        else:
            spans.append((v, i, i + 1))
    return spans


@dataclass
class WeightsApplied:
    version: int
    apply_s: float
    """Seconds from starting to read the verified file to the version being live (including the
    wait for the decode step that was running to end)."""
    details: dict[str, Any] = field(default_factory=dict)


class WeightLoadError(RuntimeError):
    """A weight file that cannot be applied (names, shapes, format); the old weights stay live."""


class Engine(ABC):
    """Samples the policy; one instance per replica, used from one asyncio loop."""

    capacity: int
    """Sequences decoded together; more wait in the engine's queue."""
    max_model_len: int
    """Longest prompt plus completion."""

    @property
    @abstractmethod
    def version(self) -> int:
        """The policy version live now."""

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer (chat template, stop-string decoding)."""

    @property
    @abstractmethod
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end a completion (finish reason `stop`)."""

    @abstractmethod
    async def start(self) -> None:
        """Load the model (version 0) and start stepping."""

    @abstractmethod
    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> Generation:
        """Sample one completion of `prompt_ids`; waits in the queue when the engine is full."""

    @abstractmethod
    async def update_weights(
        self, path: Path, version: int, *, sha256: str | None = None, chunks: ChunkDigests | None = None
    ) -> WeightsApplied:
        """Apply a safetensors file between decode steps. With `sha256` (the announced digest) the
        file is verified before the version goes live, `offbeat.weights.ChecksumError` if it is not
        that file; with `chunks` (the announced chunk digests) it is verified by those instead, on
        every core; neither: the caller has verified it. Raises `WeightLoadError` when it does not
        fit the model. Either way the old weights stay live."""

    @abstractmethod
    async def close(self) -> None:
        """Stop stepping; sequences still held finish with reason `abort`."""

    @property
    def vocab_size(self) -> int:
        """Token ids the model takes: [0, vocab_size). A prompt id outside it is refused before it
        reaches the engine (an embedding lookup out of range kills the engine thread)."""
        return len(self.tokenizer)

    @property
    def in_flight(self) -> int:
        """Sequences admitted or queued now (for health and metrics)."""
        return 0

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer generate (None while it can)."""
        return None
