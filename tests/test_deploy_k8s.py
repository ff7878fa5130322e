"""deploy/k8s, deploy/nats, deploy/postgres: render every overlay, validate every object strictly.

Rendering uses `kubectl kustomize` (the kustomize built into kubectl); validation uses
`kubernetes-validate` in strict mode (unknown fields are errors) against the schemas it ships,
offline. The CloudNativePG Cluster is a custom resource with no schema there: it is parsed and
checked for the fields the operator requires. Beyond schema validity, the tests check the
properties the manifests exist for: hardened pods, credentials only from Secrets, env references
that Kubernetes can expand, the sandbox's egress policy, the H200 topology, and that the run
config is the same file `offbeat run` uses.

Not covered: applying to a live cluster (none is reachable here).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from offbeat.testing import check_env_overrides as check_overrides

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["base", "overlays/h200"]
# A current release, and the newest schemas the installed kubernetes-validate ships.
K8S_VERSIONS = ["1.34.0"]
SECRETS = {"offbeat-nats", "offbeat-admin", "offbeat-ledger-app"}
WORKLOADS = {"Deployment", "StatefulSet", "Job", "DaemonSet"}
SANDBOX_AS_ROOT = "sandbox"
SANDBOX_CAPS = {"SETUID", "SETGID", "KILL"}
RDMA_CAPS = {"IPC_LOCK"}


def kubectl() -> str:
    path = shutil.which("kubectl")
    assert path, (
        "kubectl is not installed: the deploy tests render the overlays with `kubectl kustomize` "
        "(Debian: apt-get install kubernetes-client; .ci/run installs it)"
    )
    return path


def render(directory: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def validate_all(objects: list[dict[str, Any]]) -> None:
    """Strict schema validation of every object; raises with the object's kind/name on the first error."""
    try:
        import kubernetes_validate
    except ImportError:  # pragma: no cover - dev extra missing
        pytest.fail("kubernetes-validate is not installed: pip install -e '.[dev]'")
    versions = [*K8S_VERSIONS, kubernetes_validate.utils.latest_version()]
    for obj in objects:
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
                raise AssertionError(f"{name} is invalid for Kubernetes {version}: {exc.message}") from exc


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(K8S / name) for name in OVERLAYS}


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_passes_strict_validation(rendered, overlay):
    objects = rendered[overlay]
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "StatefulSet", "ConfigMap", "Service", "NetworkPolicy"} <= kinds, kinds
    validate_all(objects)


def test_a_broken_manifest_fails_validation(tmp_path):
    """An overlay with a misspelt field and one with a wrong type both render but fail validation."""
    cases = {
        "typo": "- op: add\n  path: /spec/template/spec/containers/0/imagePullPolcy\n  value: Always\n",
        "type": '- op: replace\n  path: /spec/replicas\n  value: "three"\n',
    }
    for name, patch in cases.items():
        overlay = tmp_path / name
        overlay.mkdir()
        shutil.copytree(K8S / "base", overlay / "base")
        (overlay / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - base\n"
            "patches:\n  - target: {kind: Deployment, name: inference}\n    patch: |-\n"
            + "".join(f"      {line}\n" for line in patch.splitlines())
        )
        objects = render(overlay)
        with pytest.raises(AssertionError, match=r"Deployment/inference is invalid"):
            validate_all(objects)


def test_pods_are_hardened(rendered):
    for overlay, objects in rendered.items():
        for obj in (o for o in objects if o["kind"] in WORKLOADS):
            where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
            pod = obj["spec"]["template"]["spec"]
            if obj["metadata"]["name"] == SANDBOX_AS_ROOT:
                # uid 0 with only what switching workers to their own uids needs (see sandbox.yaml)
                assert pod["securityContext"]["runAsUser"] == 0, where
            else:
                assert pod["securityContext"]["runAsNonRoot"] is True, where
                assert pod["securityContext"]["runAsUser"] != 0, where
            assert pod.get("automountServiceAccountToken") is False, where
            for c in containers(obj):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, f"{where}/{c['name']}"
                assert sc["readOnlyRootFilesystem"] is True, f"{where}/{c['name']}"
                assert sc["capabilities"]["drop"] == ["ALL"], f"{where}/{c['name']}"
                allowed = SANDBOX_CAPS if obj["metadata"]["name"] == SANDBOX_AS_ROOT else RDMA_CAPS
                assert set(sc["capabilities"].get("add", [])) <= allowed, f"{where}/{c['name']}"
                assert "privileged" not in sc, f"{where}/{c['name']}"
                assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], (
                    f"{where}/{c['name']}"
                )
            for c in pod["containers"]:
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert c[probe]["httpGet"]["path"] == "/healthz", f"{where}/{c['name']} {probe}"


def test_credentials_come_only_from_secrets_and_expand(rendered):
    """No literal secret in any env value; every $(VAR) refers to a variable defined before it
    (Kubernetes expands only those, a later or missing one stays literally `$(VAR)`)."""
    seen_secrets: set[str] = set()
    for overlay, objects in rendered.items():
        for obj in (o for o in objects if o["kind"] in WORKLOADS):
            for c in containers(obj):
                where = f"{overlay}: {obj['metadata']['name']}/{c['name']}"
                defined: set[str] = set()
                for env in c.get("env", []):
                    value = env.get("value")
                    if value is not None:
                        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value):
                            assert ref in defined, (
                                f"{where}: {env['name']} uses $({ref}) before it is defined"
                            )
                        assert not re.search(r"://[^:/@$]+:[^@$(]+@", value), (
                            f"{where}: literal password in {env['name']}"
                        )
                        assert "PASSWORD" not in env["name"] and "TOKEN" not in env["name"], (
                            f"{where}: {env['name']} must come from a Secret"
                        )
                    else:
                        ref = env["valueFrom"].get("secretKeyRef")
                        if ref:
                            seen_secrets.add(ref["name"])
                    defined.add(env["name"])
                for arg in [*c.get("args", []), *c.get("command", [])]:
                    assert "PASSWORD" not in arg and "@" not in arg, f"{where}: credential in argv: {arg}"
    assert seen_secrets == SECRETS, seen_secrets
    for overlay, objects in rendered.items():
        assert not by_kind(objects, "Secret"), f"{overlay}: Secrets are created out of band, never rendered"


def test_sandbox_egress_is_denied_except_nats(rendered):
    for overlay, objects in rendered.items():
        policy = by_kind(objects, "NetworkPolicy")["sandbox-deny-egress"]["spec"]
        assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "sandbox"}
        assert "Egress" in policy["policyTypes"]
        allowed = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
        assert allowed == {4222, 53}, f"{overlay}: sandbox may reach ports {allowed}"
        sandbox = by_kind(objects, "Deployment")["sandbox"]["spec"]["template"]["spec"]
        assert not any(v.get("persistentVolumeClaim") for v in sandbox["volumes"]), "sandbox mounts run state"
    h200 = by_kind(rendered["overlays/h200"], "Deployment")["sandbox"]["spec"]["template"]["spec"]
    assert h200["runtimeClassName"] == "gvisor"
    assert "gvisor" in by_kind(rendered["overlays/h200"], "RuntimeClass")


def test_h200_topology(rendered):
    objects = rendered["overlays/h200"]
    inference = by_kind(objects, "Deployment")["inference"]
    trainer = by_kind(objects, "StatefulSet")["trainer"]
    gpus_per_replica = int(
        inference["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    )
    trainer_c = trainer["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in trainer_c["env"]}
    assert int(trainer_c["resources"]["limits"]["nvidia.com/gpu"]) == 8
    assert trainer["spec"]["replicas"] == int(env["TRAINER_NNODES"]) == 16
    assert int(env["TRAINER_NPROC_PER_NODE"]) == 8
    inference_nodes = inference["spec"]["replicas"] * gpus_per_replica / 8
    assert inference_nodes == 44 and inference_nodes + trainer["spec"]["replicas"] <= 64
    assert any(k.startswith("NCCL_") for k in env)
    for obj in (inference, trainer):
        pod = obj["spec"]["template"]["spec"]
        assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H200"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    pvc = by_kind(objects, "PersistentVolumeClaim")["offbeat-shared"]["spec"]
    assert pvc["accessModes"] == ["ReadWriteMany"] and pvc["storageClassName"]
    headless = by_kind(objects, "Service")["trainer"]["spec"]
    assert headless["clusterIP"] == "None" and trainer["spec"]["serviceName"] == "trainer"
    assert "--rdzv-endpoint=trainer-0.trainer:29400" in trainer_c["command"]


def test_run_config_is_the_example(rendered):
    """The ConfigMap holds examples/arithmetic.toml byte for byte: the file `offbeat run` uses."""
    example = ROOT / "examples" / "arithmetic.toml"
    copy_in_base = (K8S / "base" / "run.toml").read_text()
    assert copy_in_base == example.read_text(), (
        "deploy/k8s/base/run.toml differs from examples/arithmetic.toml: cp examples/arithmetic.toml deploy/k8s/base/run.toml"
    )
    for overlay, objects in rendered.items():
        (cm,) = [
            o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("offbeat-run")
        ]
        assert cm["data"]["run.toml"] == example.read_text(), overlay
        for obj in (o for o in objects if o["kind"] in WORKLOADS):
            volumes = {v["name"]: v for v in obj["spec"]["template"]["spec"]["volumes"]}
            assert volumes["run-config"]["configMap"]["name"] == cm["metadata"]["name"], obj["metadata"][
                "name"
            ]


def test_config_overrides_name_real_fields(rendered):
    for overlay, objects in rendered.items():
        for obj in (o for o in objects if o["kind"] in WORKLOADS):
            for c in containers(obj):
                env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
                check_overrides(env, f"{overlay}: {obj['metadata']['name']}/{c['name']}")
    with pytest.raises(AssertionError, match="admin_prot"):
        check_overrides({"OFFBEAT__ORCHESTRATOR__ADMIN_PROT": "1"}, "typo")
    with pytest.raises(AssertionError, match="max_steps"):
        check_overrides({"OFFBEAT__RUN__MAX_STEPS": "many"}, "type")


# --- custom resources and Helm values -------------------------------------------------------

CNPG_SPEC_FIELDS = {
    "instances",
    "imageName",
    "primaryUpdateStrategy",
    "enableSuperuserAccess",
    "bootstrap",
    "postgresql",
    "storage",
    "walStorage",
    "resources",
    "affinity",
    "monitoring",
    "superuserSecret",
    "backup",
    "description",
    "inheritedMetadata",
    "minSyncReplicas",
    "maxSyncReplicas",
    "managed",
    "env",
}
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")


def check_cnpg_cluster(doc: dict[str, Any]) -> None:
    """The fields the CloudNativePG operator requires of a Cluster, and no unknown spec field."""
    assert doc.get("apiVersion") == "postgresql.cnpg.io/v1", doc.get("apiVersion")
    assert doc.get("kind") == "Cluster"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]
    unknown = set(spec) - CNPG_SPEC_FIELDS
    assert not unknown, f"unknown Cluster spec fields: {unknown}"
    assert isinstance(spec["instances"], int) and spec["instances"] >= 1, spec.get("instances")
    assert QUANTITY.match(str(spec["storage"]["size"])), spec["storage"]
    initdb = spec["bootstrap"]["initdb"]
    assert initdb["database"] and initdb["owner"]
    for key, value in spec.get("postgresql", {}).get("parameters", {}).items():
        assert isinstance(value, str), f"postgresql.parameters.{key} must be a string"


def test_cnpg_cluster():
    doc = yaml.safe_load((ROOT / "deploy" / "postgres" / "cluster.yaml").read_text())
    check_cnpg_cluster(doc)
    assert doc["spec"]["instances"] == 3 and doc["spec"]["enableSuperuserAccess"] is False
    # the orchestrator reads <cluster>-app (generated by the operator) and connects to <cluster>-rw
    name = doc["metadata"]["name"]
    assert f"{name}-app" in SECRETS
    base = (K8S / "base" / "orchestrator.yaml").read_text()
    assert f"@{name}-rw:5432/{doc['spec']['bootstrap']['initdb']['database']}" in base
    for broken in (
        lambda d: d["spec"].pop("storage"),
        lambda d: d["spec"].__setitem__("instances", "3"),
        lambda d: d["spec"].__setitem__("instanecs", 3),
        lambda d: d["spec"]["postgresql"]["parameters"].__setitem__("max_connections", 200),
    ):
        bad = copy.deepcopy(doc)
        broken(bad)
        with pytest.raises((AssertionError, KeyError)):
            check_cnpg_cluster(bad)


def test_nats_values_three_node_jetstream_with_auth():
    values = yaml.safe_load((ROOT / "deploy" / "nats" / "values.yaml").read_text())
    cfg = values["config"]
    assert cfg["cluster"]["enabled"] is True and cfg["cluster"]["replicas"] == 3
    assert cfg["jetstream"]["enabled"] is True and cfg["jetstream"]["fileStore"]["pvc"]["enabled"] is True
    assert cfg["merge"]["max_payload"] >= 8 * 1024 * 1024
    (user,) = cfg["merge"]["authorization"]["users"]
    assert user["user"] == "offbeat"
    assert user["password"] == "<< $OFFBEAT_NATS_PASSWORD >>", "the password must come from the environment"
    secret = values["container"]["env"]["OFFBEAT_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "offbeat-nats", "key": "password"}
    # the services connect as that user to the release's Service
    assert "nats://offbeat:$(NATS_PASSWORD)@nats:4222" in (K8S / "base" / "inference.yaml").read_text()


# --- probes, stream replicas, the ledger's network policy -------------------------------------


def main_env(container: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked here: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_trainer_probes_hit_the_port_every_rank_zero_process_serves(rendered):
    """Each trainer pod's probes go to the named port `health`, which is the port the image tells
    the trainer to serve /healthz on: the service (rank 0) and each pod's LOCAL_RANK 0 follower
    read the same `[trainer] health_port` (services/trainer/tests/test_follower.py)."""
    dockerfile = (ROOT / "services" / "trainer" / "Dockerfile").read_text()
    port = int(re.search(r"OFFBEAT__TRAINER__HEALTH_PORT=(\d+)", dockerfile).group(1))  # type: ignore[union-attr]
    assert "OFFBEAT__TRAINER__HEALTH_HOST=0.0.0.0" in dockerfile
    for overlay, objects in rendered.items():
        (c,) = by_kind(objects, "StatefulSet")["trainer"]["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["health"] == port, overlay
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["port"] == "health", f"{overlay}: {probe}"
        env = main_env(c)
        assert "OFFBEAT__TRAINER__HEALTH_PORT" not in env, "one port per pod: the image's"


def test_services_agree_on_stream_replicas_and_h200_uses_r3(rendered):
    """Every service creates or updates the run's streams at start with `[bus] stream_replicas`:
    all of them must say the same, and on the 3-node JetStream cluster of deploy/nats that is 3."""
    nats_nodes = yaml.safe_load((ROOT / "deploy" / "nats" / "values.yaml").read_text())["config"]["cluster"][
        "replicas"
    ]
    for overlay, objects in rendered.items():
        replicas = {}
        for obj in (o for o in objects if o["kind"] in WORKLOADS):
            for c in obj["spec"]["template"]["spec"]["containers"]:
                env = main_env(c)
                if "OFFBEAT__BUS__NATS_URL" in env:
                    replicas[obj["metadata"]["name"]] = env.get("OFFBEAT__BUS__STREAM_REPLICAS")
        assert set(replicas) == {"orchestrator", "inference", "scorer", "sandbox", "trainer"}, replicas
        assert len(set(replicas.values())) == 1, f"{overlay}: services disagree: {replicas}"
        if overlay == "overlays/h200":
            assert set(replicas.values()) == {str(nats_nodes)} == {"3"}, replicas


def test_only_the_ledger_clients_reach_postgresql(rendered):
    """A NetworkPolicy selects the CloudNativePG pods of deploy/postgres/cluster.yaml; on 5432 it
    admits exactly the workloads given the database URL, the instances themselves and the operator."""
    cluster = yaml.safe_load((ROOT / "deploy" / "postgres" / "cluster.yaml").read_text())
    pg_labels = {"cnpg.io/cluster": cluster["metadata"]["name"]}
    for overlay, objects in rendered.items():
        policies = [
            p["spec"]
            for p in by_kind(objects, "NetworkPolicy").values()
            if selects(p["spec"]["podSelector"], pg_labels)
        ]
        assert len(policies) == 1, f"{overlay}: {len(policies)} NetworkPolicies select the ledger's pods"
        (policy,) = policies
        assert "Ingress" in policy["policyTypes"]
        workloads = {o["metadata"]["name"]: o for o in objects if o["kind"] in WORKLOADS}
        clients = {
            name
            for name, obj in workloads.items()
            if any("OFFBEAT__LEDGER__DATABASE_URL" in main_env(c) for c in containers(obj))
        }
        assert clients == {"orchestrator"}, clients
        admitted: set[str] = set()
        operator = peers_of_pg = False
        for rule in policy["ingress"]:
            assert rule.get("from"), f"{overlay}: an ingress rule without `from` admits every pod"
            ports = {p["port"] for p in rule["ports"]}
            for peer in rule["from"]:
                assert "ipBlock" not in peer, peer
                if "namespaceSelector" in peer:
                    assert peer["namespaceSelector"]["matchLabels"] == {
                        "kubernetes.io/metadata.name": "cnpg-system"
                    }, peer
                    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "cloudnative-pg"}
                    operator = ports == {5432, 8000}
                    continue
                if selects(peer["podSelector"], pg_labels):
                    peers_of_pg = ports >= {5432}
                    continue
                assert ports == {5432}, rule
                admitted |= {
                    name
                    for name, obj in workloads.items()
                    if selects(peer["podSelector"], obj["spec"]["template"]["metadata"]["labels"])
                }
        assert admitted == clients, (
            f"{overlay}: PostgreSQL admits {admitted}, the ledger's clients are {clients}"
        )
        assert operator and peers_of_pg, f"{overlay}: the operator and the instances must reach the instances"
