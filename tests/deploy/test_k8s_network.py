"""The NetworkPolicies of the rendered overlays, evaluated (tests/deploy/netpol.py): every flow the
deployment needs is open, and the ones that must stay closed are closed (issue 14 #4): strangers to
MLflow and the Ray dashboards, Ray pods to PostgreSQL, one Ray cluster to the other, MLflow to Ray,
PostgreSQL and MinIO to anywhere."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import k8s_checks as kc  # noqa: E402
import netpol as npl  # noqa: E402
from netpol import Endpoint, external  # noqa: E402

OPERATOR = Endpoint("KubeRay operator", "kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
DNS = Endpoint("cluster DNS", "kube-system", {"k8s-app": "kube-dns"})
STRANGER = Endpoint("a pod in another namespace", "default", {"app": "shell"})
S3 = external("S3", "52.216.10.20")
EXTERNAL_DB = external("the external PostgreSQL", "198.51.100.7")


@pytest.fixture(scope="module", params=kc.OVERLAYS)
def overlay(request):
    try:
        kc.find_kubectl()
    except kc.SetupError as e:
        pytest.fail(str(e), pytrace=False)
    objs = kc.render_overlay(request.param)
    ends = {
        "search_head": npl.pod(objs, "tldr-search", "ray-head"),
        "search_worker": npl.pod(objs, "tldr-search", "ray-worker"),
        "submitter": npl.pod(objs, "tldr-search-submitter"),
        "reaudit_head": npl.pod(objs, "tldr-reaudit", "ray-head"),
        "reaudit_worker": npl.pod(objs, "tldr-reaudit", "ray-worker"),
        "cron": npl.pod(objs, "tldr-reaudit-submit"),
        "mlflow": npl.pod(objs, "mlflow"),
        # an unlabelled debugging pod someone starts in the namespace
        "intruder": Endpoint("kubectl run debug", "tldr", {"run": "debug"}),
    }
    if request.param == "cpu-dev":
        ends |= {"postgres": npl.pod(objs, "postgres"), "minio": npl.pod(objs, "minio"),
                 "buckets": npl.pod(objs, "create-buckets")}
    return request.param, objs, ends


def _check(objs, ends, flows, expect: bool):
    wrong = []
    for src, dst, port, *proto in flows:
        s = ends.get(src, src) if isinstance(src, str) else src
        d = ends.get(dst, dst) if isinstance(dst, str) else dst
        if npl.allowed(objs, s, d, port, *(proto or ["TCP"])) != expect:
            wrong.append(f"{s.name} -> {d.name}:{port}")
    assert not wrong, ("closed but needed: " if expect else "open but must be closed: ") + "; ".join(wrong)


def test_needed_flows_are_open(overlay):
    name, objs, e = overlay
    flows = [("search_worker", "search_head", 6379), ("search_head", "search_worker", 10002),
             ("search_worker", "search_worker", 40123), ("submitter", "search_head", 8265),
             (OPERATOR, "search_head", 8265), ("cron", "reaudit_head", 8265),
             ("reaudit_worker", "reaudit_head", 6379), ("reaudit_head", "reaudit_worker", 10002),
             ("search_worker", "mlflow", 5000), ("search_head", "mlflow", 5000), ("reaudit_head", "mlflow", 5000),
             ("reaudit_worker", "mlflow", 5000), ("search_worker", S3, 443), ("reaudit_head", S3, 443),
             ("mlflow", S3, 443)]
    flows += [(p, DNS, 53, "UDP") for p in e if p != "intruder"] + [(p, DNS, 53, "TCP") for p in e if p != "intruder"]
    if name == "gpu":
        flows += [("mlflow", EXTERNAL_DB, 5432)]
    else:
        flows += [("mlflow", "postgres", 5432), ("mlflow", "minio", 9000), ("search_worker", "minio", 9000),
                  ("reaudit_head", "minio", 9000), ("buckets", "minio", 9000)]
    _check(objs, e, flows, expect=True)


def test_everything_else_is_closed(overlay):
    name, objs, e = overlay
    flows = [(STRANGER, "mlflow", 5000), (STRANGER, "search_head", 8265), (STRANGER, "search_worker", 6379),
             (STRANGER, "reaudit_head", 8265), ("intruder", "mlflow", 5000), ("intruder", "search_head", 8265),
             ("intruder", S3, 443), ("mlflow", "search_head", 8265), ("mlflow", "reaudit_head", 6379),
             ("submitter", "mlflow", 5000), ("submitter", S3, 443), ("submitter", "search_worker", 6379),
             ("cron", "search_head", 8265), ("cron", "mlflow", 5000), ("cron", "reaudit_worker", 6379),
             ("search_worker", "reaudit_head", 6379), ("reaudit_worker", "search_head", 6379),
             (OPERATOR, "search_worker", 6379), (OPERATOR, "reaudit_head", 6379), ("search_head", EXTERNAL_DB, 5432),
             ("search_worker", S3, 80), ("mlflow", S3, 22), ("mlflow", "search_worker", 5000)]
    if name == "cpu-dev":
        flows += [("search_worker", "postgres", 5432), ("reaudit_head", "postgres", 5432), ("postgres", S3, 443),
                  ("minio", S3, 443), ("postgres", "mlflow", 5000), ("buckets", "mlflow", 5000),
                  ("buckets", "postgres", 5432), ("cron", "minio", 9000)]
    _check(objs, e, flows, expect=False)


def test_the_evaluator_sees_a_widened_policy(overlay):
    """Control: open MLflow's ingress to everyone and the evaluator must report a stranger getting in;
    drop the default deny and a pod no other policy selects takes connections from anyone."""
    _name, objs, e = overlay
    wide = copy.deepcopy(objs)
    (policy,) = [o for o in wide if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "mlflow"]
    policy["spec"]["ingress"] = [{}]
    assert npl.allowed(wide, STRANGER, e["mlflow"], 5000) and not npl.allowed(objs, STRANGER, e["mlflow"], 5000)
    no_deny = [o for o in objs if not (o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "default-deny")]
    assert npl.allowed(no_deny, STRANGER, e["intruder"], 8080) and not npl.allowed(objs, STRANGER, e["intruder"], 8080)
    assert not npl.allowed(no_deny, STRANGER, e["search_head"], 8265)  # the head's own policy still holds


@pytest.mark.parametrize("peer,port,expect", [
    ({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}, 443, [True, False, False]),
    ({"podSelector": {"matchLabels": {"a": "b"}}}, 443, [False, False, True]),
    ({"namespaceSelector": {}}, 443, [False, False, True]),
])
def test_peer_semantics(peer, port, expect):
    """ipBlock matches outside addresses (with its exceptions) and never a pod; podSelector only pods of
    the policy's namespace; an empty namespaceSelector every pod of every namespace."""
    objs = [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "p", "namespace": "n"},
             "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [peer]}]}}]
    src = Endpoint("src", "n", {"x": "y"})
    targets = [external("in", "10.2.3.4"), external("excepted", "10.1.2.3"), Endpoint("pod", "n", {"a": "b"})]
    assert [npl.allowed(objs, src, t, port) for t in targets] == expect


def test_named_and_ranged_ports():
    objs = [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "p", "namespace": "n"},
             "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": "dashboard"},
                                                                {"port": 7000, "endPort": 7002}]}]}}]
    dst = Endpoint("head", "n", {}, {"dashboard": 8265})
    src = Endpoint("client", "n", {})
    assert [npl.allowed(objs, src, dst, p) for p in (8265, 7000, 7002, 7003, 6379)] == [True, True, True, False, False]
    assert npl.allowed(objs, src, dst, 8265, "UDP") is False
