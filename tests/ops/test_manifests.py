"""deploy/k8s validates against the Kubernetes schemas, and agrees with the service's own settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from service.store.redis_backend import GROUP

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest minor the manifests are meant for


def kustomization() -> dict[str, Any]:
    return dict(yaml.safe_load((K8S / "kustomization.yaml").read_text()))


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in kustomization()["resources"]:
        docs.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    return docs


def one(kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def container(kind: str, name: str) -> dict[str, Any]:
    return dict(one(kind, name)["spec"]["template"]["spec"]["containers"][0])


def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def core_documents() -> list[dict[str, Any]]:
    """Everything but KEDA's ScaledObject, whose CRD schema kubernetes-validate does not bundle
    (test_scaled_object_scales_the_workers_on_the_job_stream checks its structure)."""
    return [d for d in documents() if not d["apiVersion"].startswith("keda.sh/")]


@pytest.mark.parametrize("doc", core_documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_core_kinds_validate_against_the_kubernetes_schemas(doc: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the test extra's kubernetes-validate")
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_scaled_object_scales_the_workers_on_the_job_stream() -> None:
    scaled = one("ScaledObject", "icr-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == one("Deployment", "icr-worker")["metadata"]["name"]
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    prefix = one("ConfigMap", "icr-config")["data"]["ICR_REDIS_PREFIX"]
    namespace = kustomization()["namespace"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "redis-streams"
        meta = trigger["metadata"]
        assert meta["stream"] == f"{prefix}:jobs" and meta["consumerGroup"] == GROUP
        host, port = meta["address"].rsplit(":", 1)
        assert host == f"icr-redis.{namespace}.svc.cluster.local" and port == "6379"
        targets = [k for k in ("pendingEntriesCount", "streamLength", "lagCount") if k in meta]
        assert len(targets) == 1 and int(meta[targets[0]]) >= 1  # KEDA reads these as strings
        assert all(isinstance(v, str) for v in meta.values())
    assert any("lagCount" in t["metadata"] for t in spec["triggers"])  # the trigger that wakes workers from zero


def test_workers_take_a_gpu_drain_on_sigterm_and_are_ready_by_heartbeat() -> None:
    worker = container("Deployment", "icr-worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    job_timeout = float(one("ConfigMap", "icr-config")["data"]["ICR_JOB_TIMEOUT_S"])
    grace = one("Deployment", "icr-worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > job_timeout
    env = {e["name"]: e.get("value") for e in worker["env"]}
    port = {p["name"]: p["containerPort"] for p in worker["ports"]}[worker["readinessProbe"]["httpGet"]["port"]]
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz" and str(port) == env["ICR_WORKER_METRICS_PORT"]


def test_redis_keeps_an_aof_on_a_volume_like_compose() -> None:
    redis = container("StatefulSet", "icr-redis")
    args = redis["args"]
    settings = dict(zip(args[::2], args[1::2]))
    assert settings["--appendonly"] == "yes" and settings["--appendfsync"] == "everysec"
    claims = one("StatefulSet", "icr-redis")["spec"]["volumeClaimTemplates"]
    assert {m["name"] for m in redis["volumeMounts"]} <= {c["metadata"]["name"] for c in claims}
    compose = yaml.safe_load((K8S.parents[1] / "docker-compose.yml").read_text())["services"]["redis"]
    command = compose["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert any(volume.endswith(":/data") for volume in compose["volumes"])


def test_disruption_budgets_select_running_pods() -> None:
    for budget in (d for d in documents() if d["kind"] == "PodDisruptionBudget"):
        labels = one("Deployment", budget["metadata"]["name"])["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
