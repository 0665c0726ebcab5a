"""A small evaluator of Kubernetes NetworkPolicies (networking.k8s.io/v1) over rendered manifests:
may endpoint A open a connection to endpoint B on port P? Used by tests/deploy/test_k8s_network.py.

The semantics are the API's: a pod is isolated for ingress (egress) once any policy of its
namespace selects it with that policy type, and then only what some selecting policy's rules admit
gets through; a connection needs both the source's egress and the destination's ingress to admit
it. Peers are podSelector (policy's namespace), namespaceSelector, both (AND), or ipBlock; ports
are numbers, ranges (endPort) or container port names; an empty `from`/`to`/`ports` admits all.

Simplifications, stated so a reader can judge the tests: ipBlock matches only endpoints outside
the cluster (implementations differ on whether it matches pod IPs); traffic from a pod's own node
(kubelet probes, `kubectl port-forward`) is always allowed by Kubernetes and is not modelled.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import k8s_checks as kc


@dataclass(frozen=True)
class Endpoint:
    """A pod (namespace + labels + named container ports) or an address outside the cluster."""
    name: str
    namespace: str | None = None       # None: outside the cluster
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    ports: dict[str, int] = field(default_factory=dict, hash=False, compare=False)
    ip: str | None = None

    @property
    def external(self) -> bool:
        return self.namespace is None


def external(name: str, ip: str) -> Endpoint:
    return Endpoint(name, None, {}, {}, ip)


def pods(objs: list[dict]) -> list[Endpoint]:
    """An Endpoint for every pod template in the render (Deployment, Job, CronJob, KubeRay pods)."""
    out = []
    for obj in objs:
        for path, tpl in kc.pod_templates(obj):
            labels = dict((tpl.get("metadata") or {}).get("labels") or {})
            named = {p["name"]: p["containerPort"] for c in (tpl.get("spec") or {}).get("containers") or []
                     for p in c.get("ports") or [] if p.get("name")}
            out.append(Endpoint(f"{kc.where(obj)} {path}", kc.namespace_of(obj), labels, named))
    return out


def pod(objs: list[dict], name: str, component: str | None = None) -> Endpoint:
    """The one pod template labelled app.kubernetes.io/name=`name` (and .../component=`component`)."""
    want = {"app.kubernetes.io/name": name, **({"app.kubernetes.io/component": component} if component else {})}
    found = [p for p in pods(objs) if all(p.labels.get(k) == v for k, v in want.items())]
    assert len(found) == 1, f"expected one pod with {want}, found {[p.name for p in found]}"
    return found[0]


def _namespace_labels(objs: list[dict], name: str) -> dict[str, str]:
    labels = {"kubernetes.io/metadata.name": name}  # set by the API server on every namespace
    for o in objs:
        if o.get("kind") == "Namespace" and o["metadata"]["name"] == name:
            labels.update(o["metadata"].get("labels") or {})
    return labels


def _policy_types(spec: dict) -> set[str]:
    if spec.get("policyTypes"):
        return set(spec["policyTypes"])
    return {"Ingress"} | ({"Egress"} if spec.get("egress") else set())


def _peer_matches(objs: list[dict], policy_ns: str | None, peer: dict, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if not other.external:
            return False
        ip = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return (ip in ipaddress.ip_network(block["cidr"])
                and not any(ip in ipaddress.ip_network(x) for x in block.get("except") or []))
    if other.external:
        return False
    ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
    if ns_sel is None and other.namespace != policy_ns:
        return False
    if ns_sel is not None and not kc._labels_match(ns_sel, _namespace_labels(objs, other.namespace)):
        return False
    return pod_sel is None or kc._labels_match(pod_sel, other.labels)


def _port_matches(rule_ports: list[dict] | None, port: int, protocol: str, dst: Endpoint) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        want: Any = p.get("port")
        if want is None:
            return True
        if isinstance(want, str) and not want.isdigit():
            want = dst.ports.get(want)  # a named port of the destination's containers
            if want is None:
                continue
        lo, hi = int(want), int(p.get("endPort", want))
        if lo <= port <= hi:
            return True
    return False


def _side_allows(objs: list[dict], subject: Endpoint, other: Endpoint, port: int, protocol: str,
                 direction: str, dst: Endpoint) -> bool:
    """Does `subject`'s namespace let `subject` send (Egress) to / receive (Ingress) from `other`?"""
    if subject.external:
        return True  # outside the cluster: not governed by these policies
    key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    selecting = [o for o in objs if o.get("kind") == "NetworkPolicy" and kc.namespace_of(o) == subject.namespace
                 and direction in _policy_types(o.get("spec") or {})
                 and kc._labels_match((o.get("spec") or {}).get("podSelector") or {}, subject.labels)]
    if not selecting:
        return True  # not isolated in this direction
    for policy in selecting:
        for rule in (policy.get("spec") or {}).get(key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(_peer_matches(objs, subject.namespace, p, other) for p in peers)) \
                    and _port_matches(rule.get("ports"), port, protocol, dst):
                return True
    return False


def allowed(objs: list[dict], src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """May `src` open a connection to `dst` on `port`? Both ends' policies must admit it."""
    return (_side_allows(objs, src, dst, port, protocol, "Egress", dst)
            and _side_allows(objs, dst, src, port, protocol, "Ingress", dst))
