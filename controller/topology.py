"""The overlay as a graph (networkx): nodes, groups, jobs, and the VXLAN tunnels between nodes.

Vertices: "node/<name>", "group/<name>", "job/<id>". Edges: job -runs-on-> node, job -member-of-> group,
node -tunnel- node (one per group whose jobs span both nodes; attrs: group, vni).
"""

from __future__ import annotations

import itertools
from typing import Any

import networkx as nx

from controller.cluster import Cluster
from protos.jobnet.v1 import jobnet_pb2 as pb


def build(c: Cluster, group: str = "") -> nx.MultiGraph[str]:
    g: nx.MultiGraph[str] = nx.MultiGraph()
    groups = [group] if group else sorted(c.groups)
    for name in groups:
        grp = c.groups[name]
        g.add_node(f"group/{name}", kind="group", subnet=grp.subnet, vni=str(grp.vni), mtu=str(grp.mtu))
        for j in c.live_jobs(group=name):
            node = c.nodes.get(j.node)
            g.add_node(f"node/{j.node}", kind="node", underlay_ip=node.underlay_ip if node else "",
                       state=pb.NodeState.Name(node.state).removeprefix("NODE_STATE_") if node else "UNKNOWN")
            g.add_node(f"job/{j.id}", kind="job", ip=j.ip, mac=j.mac, name=j.name,
                       state=pb.JobState.Name(j.state).removeprefix("JOB_STATE_"))
            g.add_edge(f"job/{j.id}", f"node/{j.node}", kind="runs-on")
            g.add_edge(f"job/{j.id}", f"group/{name}", kind="member-of")
        for a, b in itertools.combinations(sorted(c.nodes_of_group(name)), 2):
            g.add_edge(f"node/{a}", f"node/{b}", kind="tunnel", group=name, vni=str(grp.vni))
    if not group:
        for name, node in c.nodes.items():
            g.add_node(f"node/{name}", kind="node", underlay_ip=node.underlay_ip,
                       state=pb.NodeState.Name(node.state).removeprefix("NODE_STATE_"))
    return g


def to_proto(g: nx.MultiGraph[str], revision: int) -> pb.Topology:
    t = pb.Topology(revision=revision)
    nattrs: dict[str, dict[str, Any]] = {v: g.nodes[v] for v in g.nodes}
    for vid, attrs in sorted(nattrs.items()):
        t.nodes.append(pb.TopologyNode(id=vid, kind=attrs["kind"],
                                       attrs={k: str(v) for k, v in attrs.items() if k != "kind"}))
    edges: list[tuple[str, str, dict[str, Any]]] = list(g.edges(data=True))
    for a, b, attrs in sorted(edges, key=lambda e: (e[2]["kind"], e[0], e[1])):
        if attrs["kind"] != "tunnel" and not a.startswith("job/"):
            a, b = b, a  # the graph is undirected; the API says job -> node, job -> group
        t.edges.append(pb.TopologyEdge(source=a, target=b, kind=attrs["kind"],
                                       attrs={k: str(v) for k, v in attrs.items() if k != "kind"}))
    return t
