"""The inference service: rollout requests in, one completion per sample out.

Start-up: load the engine (version 0 = `[model] path`), subscribe to `policy.weights` and catch up
with the KV head, subscribe to `control.*` and read the paused flag, then report healthy and pull
from the `inference` consumer with at most `max_requests_in_flight` requests held at once. Each
request's n samples go to the engine together; each finished sample is published at once as a
`RolloutCompletion` (msg id `completion:{trajectory_id}`; samples that finish together, of any
request, go out in one pipelined batch, `BatchPublisher`), and the request is acked when the
server has stored all n. A redelivered request is generated again; the server's dedup drops the repeats.

Requests that can never succeed (n < 1, trajectory ids that do not match n, no prompt, a chat
template that fails, a prompt that does not fit the context length, prompt token ids outside the
vocabulary, a temperature that is not a number or is positive but below `MIN_TEMPERATURE`) are
dead-lettered with the reason; none of them reaches the engine. Pause stops pulling new requests
while the ones held finish (a request that the pull open at the moment of the pause still delivers
is nak'ed back, unstarted; that costs it one of its `max_deliver` deliveries); resume pulls again;
stop drains and exits.

Not covered: choosing what to generate (the orchestrator) or scoring it (the scorer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from offbeat.bus import BatchPublisher, Bus, Delivery, Publication, Reject
from offbeat.config import RunConfig
from offbeat.service import ServiceContext
from offbeat.v1 import policy_pb2, rollout_pb2
from offbeat_inference.config import InferenceConfig
from offbeat_inference.engine import MIN_TEMPERATURE, Engine, Generation, Sampling
from offbeat_inference.updates import WeightFollower

log = logging.getLogger("offbeat.inference")

COMPLETIONS = Counter("offbeat_inference_completions_total", "Completions published", ["finish_reason"])
TOKENS = Counter("offbeat_inference_completion_tokens_total", "Completion tokens generated")


def build_engine(run: RunConfig, config: InferenceConfig) -> Engine:
    """The configured engine, not yet started."""
    if not run.model.path:
        raise ValueError("[model] path is empty: set it to a Hugging Face id or a local model directory")
    max_model_len = config.max_model_len or run.model.max_model_len
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    if config.engine == "vllm":
        from offbeat_inference.vllm_engine import VLLMEngine

        return VLLMEngine(
            run.model.path,
            dtype=run.model.dtype,
            capacity=config.max_batch,
            max_model_len=max_model_len,
            trust_remote_code=run.model.trust_remote_code,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            cpu_kv_cache_gib=config.vllm_kv_cache_gib,
            enforce_eager=config.vllm_enforce_eager,
            seed=run.run.seed,
        )
    from offbeat_inference.hf_engine import HFEngine

    return HFEngine(
        run.model.path,
        dtype=run.model.dtype,
        capacity=config.max_batch,
        max_model_len=max_model_len,
        max_prefill_tokens=config.max_prefill_tokens,
        device=config.device,
        trust_remote_code=run.model.trust_remote_code,
    )


def render_prompt(tokenizer: Any, request: rollout_pb2.RolloutRequest) -> list[int]:
    """The prompt's token ids: given, tokenized text, or chat messages through the chat template."""
    kind = request.WhichOneof("prompt")
    if kind == "tokens":
        return list(request.tokens.token_ids)
    if kind == "text":
        return list(tokenizer.encode(request.text, add_special_tokens=True))
    if kind == "chat":
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        try:
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # a template's raise_exception, or any bug in it: retrying cannot help
            raise ValueError(f"the chat template failed: {type(exc).__name__}: {exc}") from exc
        return [int(t) for t in ids]
    raise Reject("request has no prompt (text, chat or tokens)")


def sampling_for(request: rollout_pb2.RolloutRequest, index: int, *, default_max_tokens: int) -> Sampling:
    """Sample `index`'s settings: proto zeros mean greedy (temperature), off (top-p, top-k), default
    (max tokens); the seed of sample i is the request's seed + i."""
    s = request.sampling
    return Sampling(
        temperature=max(0.0, s.temperature),
        top_p=s.top_p if 0.0 < s.top_p < 1.0 else 1.0,
        top_k=max(0, s.top_k),
        max_tokens=s.max_tokens if s.max_tokens > 0 else default_max_tokens,
        stop=tuple(x for x in s.stop if x),
        seed=s.seed + index if s.HasField("seed") else None,
    )


class InferenceService:
    def __init__(self, ctx: ServiceContext[InferenceConfig], engine: Engine | None = None) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.bus: Bus = ctx.bus
        self.engine = engine or build_engine(ctx.run, ctx.config)
        weights_dir = Path(
            self.config.weights_dir
            or Path(ctx.run.run.state_dir) / "inference" / self.config.replica / "weights"
        )
        self.follower = WeightFollower(
            self.bus,
            self.engine,
            replica=self.config.replica,
            weights_dir=weights_dir,
            head_poll_s=self.config.head_poll_s,
        )
        self.paused = asyncio.Event()
        self.resumed = asyncio.Event()
        self.requests_in_flight = 0
        self.failure: str | None = None
        self._subs: list[Any] = []
        self.publisher = BatchPublisher(self.bus)
        """Completions finish one by one across requests; they go out together in batches."""

    async def run(self) -> None:
        ctx = self.ctx
        await self.engine.start()
        log.info(
            "engine %s ready: capacity %d, context %d",
            type(self.engine).__name__,
            self.engine.capacity,
            self.engine.max_model_len,
        )
        self._subs.append(
            await self.bus.subscribe(
                self.bus.subjects.control_all, policy_pb2.ControlCommand, self._on_control
            )
        )
        self._set_paused(await self.bus.is_paused())
        await self.follower.start()
        follower = asyncio.create_task(self.follower.run(ctx.stop))
        refresher = asyncio.create_task(self._refresh_details())
        publishing = asyncio.create_task(self.publisher.run())
        ctx.set_healthy()
        try:
            await self._pull_until_stopped()
        finally:
            ctx.set_healthy(False)
            refresher.cancel()
            self.publisher.close()  # after the consumer returned: no sample is waiting on it any more
            await asyncio.gather(publishing, return_exceptions=True)
            for sub in self._subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            await self.follower.close()
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await self.engine.close()
        if self.failure is not None:
            raise RuntimeError(self.failure)

    def details(self) -> dict[str, Any]:
        return {
            "engine": type(self.engine).__name__,
            "version": self.engine.version,
            "paused": self.paused.is_set(),
            "requests_in_flight": self.requests_in_flight,
            "sequences_in_flight": self.engine.in_flight,
            "failure": self.engine.failure,
        }

    async def _refresh_details(self) -> None:
        """Keep /healthz current; an engine that can no longer generate stops the replica (its
        requests are redelivered to others), so a supervisor can restart it."""
        while True:
            self.ctx.details.update(self.details())
            self._check_engine()
            await asyncio.sleep(0.5)

    def _check_engine(self) -> None:
        """Stop pulling at once when the engine is dead, so this replica burns no more deliveries."""
        failure = self.engine.failure
        if failure is not None and self.failure is None:
            log.error("stopping: %s", failure)
            self.failure = failure
            self.ctx.set_healthy(False)
            self.ctx.stop.set()

    async def _pull_until_stopped(self) -> None:
        stop = self.ctx.stop
        limit = self.config.max_requests_in_flight or 2 * self.config.max_batch
        while not stop.is_set():
            if self.paused.is_set():
                await _first(stop.wait(), self.resumed.wait())
                continue
            halt = asyncio.Event()
            watcher = asyncio.create_task(_set_when_first(halt, stop.wait(), self.paused.wait()))
            try:
                await self.bus.consume(
                    "inference", rollout_pb2.RolloutRequest, self.handle, stop=halt, max_in_flight=limit
                )
            finally:
                watcher.cancel()

    async def _on_control(self, cmd: policy_pb2.ControlCommand) -> None:
        if cmd.run_id != self.bus.run_id:  # a command of another run, or of none, is not ours
            log.error("ignoring a control command for run %r", cmd.run_id)
            return
        if cmd.kind == policy_pb2.CONTROL_KIND_PAUSE:
            self._set_paused(True)
        elif cmd.kind == policy_pb2.CONTROL_KIND_RESUME:
            self._set_paused(False)
        elif cmd.kind == policy_pb2.CONTROL_KIND_STOP:
            log.info("stop command %s: draining", cmd.command_id)
            self.ctx.stop.set()

    def _set_paused(self, paused: bool) -> None:
        if paused:
            self.resumed.clear()
            self.paused.set()
        else:
            self.paused.clear()
            self.resumed.set()
        log.info("paused" if paused else "resumed")

    async def handle(self, request: rollout_pb2.RolloutRequest, delivery: Delivery) -> None:
        """Generate the request's n samples and publish each as soon as it is finished."""
        if self.paused.is_set():  # fetched in the pull that was open when the pause came: give it back
            delivery.defer()
            await delivery.nak(delay_s=self.config.paused_nak_delay_s)
            return
        self._check_engine()
        if self.failure is not None:
            raise RuntimeError(f"replica is stopping: {self.failure}")
        n = request.n
        if n < 1 or len(request.trajectory_ids) != n:
            raise Reject(
                f"request {request.request_id}: n={n} with {len(request.trajectory_ids)} trajectory ids"
            )
        try:
            prompt = render_prompt(self.engine.tokenizer, request)
        except (ValueError, TypeError) as exc:
            raise Reject(f"request {request.request_id}: prompt does not render: {exc}") from None
        if not prompt or len(prompt) >= self.engine.max_model_len:
            raise Reject(
                f"request {request.request_id}: prompt of {len(prompt)} tokens does not fit the context "
                f"length {self.engine.max_model_len}"
            )
        vocab = self.engine.vocab_size
        outside = next((t for t in prompt if not 0 <= t < vocab), None)
        if outside is not None:  # it would kill the engine, and every replica it is redelivered to
            raise Reject(
                f"request {request.request_id}: prompt token id {outside} is outside the vocabulary [0, {vocab})"
            )
        temperature = request.sampling.temperature
        if not math.isfinite(temperature):
            raise Reject(f"request {request.request_id}: temperature {temperature} is not finite")
        if 0 < temperature < MIN_TEMPERATURE:
            raise Reject(
                f"request {request.request_id}: temperature {temperature} is below {MIN_TEMPERATURE} "
                "(0 asks for greedy)"
            )
        self.requests_in_flight += 1
        heartbeat = asyncio.create_task(self._heartbeat(delivery))
        tasks = [asyncio.create_task(self._sample(request, prompt, i)) for i in range(n)]
        try:
            for done in asyncio.as_completed(tasks):
                await done
        finally:
            for t in tasks:
                t.cancel()
            heartbeat.cancel()
            self.requests_in_flight -= 1

    async def _sample(self, request: rollout_pb2.RolloutRequest, prompt: list[int], index: int) -> None:
        sampling = sampling_for(request, index, default_max_tokens=self.config.max_new_tokens)
        try:
            gen = await self.engine.generate(prompt, sampling)
        finally:
            self._check_engine()
        if gen.finish_reason == "abort":
            raise RuntimeError(f"engine aborted sample {index} of request {request.request_id}")
        completion = to_completion(request, index, prompt, gen, replica=self.config.replica)
        await self.publisher.publish(
            Publication(
                self.bus.subjects.rollout_completion, completion, f"completion:{completion.trajectory_id}"
            )
        )
        COMPLETIONS.labels(gen.finish_reason).inc()
        TOKENS.inc(len(gen.token_ids))

    async def _heartbeat(self, delivery: Delivery) -> None:
        interval = min(self.config.heartbeat_s, self.ctx.run.bus.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await delivery.in_progress()


def to_completion(
    request: rollout_pb2.RolloutRequest, index: int, prompt: list[int], gen: Generation, *, replica: str
) -> rollout_pb2.RolloutCompletion:
    return rollout_pb2.RolloutCompletion(
        run_id=request.run_id,
        trajectory_id=request.trajectory_ids[index],
        request_id=request.request_id,
        group_id=request.group_id,
        env=request.env,
        prompt_key=request.prompt_key,
        sample_index=index,
        group_size=request.n,
        prompt_token_ids=prompt,
        completion_token_ids=gen.token_ids,
        logprobs=gen.logprobs,
        finish_reason=gen.finish_reason,
        version_spans=[rollout_pb2.VersionSpan(version=v, start=a, end=b) for v, a, b in gen.spans],
        eval=request.eval,
        requested_at=request.created_at,
        started_at=gen.started_at,
        finished_at=gen.finished_at,
        replica=replica,
    )


async def _first(*aws: Any) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


async def _set_when_first(event: asyncio.Event, *aws: Any) -> None:
    await _first(*aws)
    event.set()


async def serve(ctx: ServiceContext[InferenceConfig]) -> None:
    started = time.perf_counter()
    service = InferenceService(ctx)
    log.info("building %s engine for %s", ctx.config.engine, ctx.run.model.path)
    await service.run()
    log.info("served for %.0fs", time.perf_counter() - started)
