"""Fixtures of the inference tests: tiny Qwen2 models built locally, and the service on a real bus."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from offbeat_inference.config import InferenceConfig

from offbeat.config import BusConfig, ModelConfig, RunConfig, RunSection
from offbeat.service import HealthServer, ServiceContext
from offbeat.tinymodel import build_tiny_model

TINY = {"hidden_size": 64, "layers": 2}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 0: the base model directory."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0, **TINY)


@pytest.fixture(scope="session")
def tiny_model_v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Other weights of the same shapes (another seed): what a trainer would publish as version 1."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_v1"), seed=1, **TINY)


@pytest.fixture
async def start_service(
    bus_config: BusConfig, run_id: str, tiny_model: Path, tmp_path: Path
) -> AsyncIterator[Callable[..., object]]:
    """Start the inference service in-process on its own bus connection; stopped afterwards."""
    from offbeat_inference.service import InferenceService

    from offbeat.bus import Bus

    running: list[tuple[object, asyncio.Task[None], Bus]] = []

    async def start(
        max_model_len: int = 1024, model_path: Path | None = None, **overrides: object
    ) -> InferenceService:
        run = RunConfig(
            run=RunSection(id=run_id, state_dir=str(tmp_path / "state")),
            bus=bus_config,
            model=ModelConfig(path=str(model_path or tiny_model), max_model_len=max_model_len),
        )
        config = InferenceConfig(replica=f"r{len(running)}", **overrides)  # type: ignore[arg-type]
        bus = await Bus.connect(bus_config, run_id, name="inference-under-test")
        await bus.ensure()
        details: dict[str, object] = {}
        ctx = ServiceContext(
            name="inference",
            run=run,
            config=config,
            bus=bus,
            stop=asyncio.Event(),
            health=HealthServer("127.0.0.1", 0, lambda: details),
            details=details,
        )
        service = InferenceService(ctx)
        task = asyncio.create_task(service.run())
        running.append((service, task, bus))
        while not ctx.health.healthy:
            assert not task.done(), (
                f"service exited during start-up: {task.exception() if task.done() else ''}"
            )
            await asyncio.sleep(0.05)
        return service

    yield start
    for service, task, bus in running:
        service.ctx.stop.set()  # type: ignore[attr-defined]
        try:
            if service.failure is None:  # type: ignore[attr-defined]
                await asyncio.wait_for(task, timeout=60)  # a service that failed fails the test here
        finally:
            service.ctx.health.close()  # type: ignore[attr-defined]
            await bus.close()
