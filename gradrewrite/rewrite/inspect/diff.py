"""Match the nodes of two graph descriptions and say what a rewrite changed.

Passes rename nodes freely (``relu`` may come back as ``relu_1``), so nodes are matched
by what they are, not what they are called: by ``(module path, op)``, and within one
such key in graph order. Inside a key, nodes with identical shape/dtype/attributes are
aligned first (a longest-common-subsequence match), so dropping the first of two ReLUs
in a block reports that one as removed rather than "changing" the second. Leftover
nodes facing each other in the same gap count as *changed*; the rest are *added* or
*removed*.
"""
from __future__ import annotations

import difflib
import json
from collections import defaultdict
from typing import Any

STATUSES = ("kept", "added", "removed", "changed")
# What makes two nodes under one key differ; annotations are how passes mark a node
# (sparsity, bits), so adding one counts as a change too.
COMPARED = ("shape", "dtype", "attrs", "annotations")


def diff(before: dict, after: dict) -> dict:
    """Compare two ``describe()`` results.

    Returns a JSON-able dict: ``status`` (``{"before": {id: status}, "after": {...}}``),
    ``pairs`` (matched ``[before_id, after_id]``), ``changes`` (after id ->
    ``{field: [before, after]}``), ``rows`` (both graphs merged in order, for tables),
    ``summary`` and ``by_op`` (counts over compute nodes), ``weights`` (counts over
    ``get_attr`` nodes), ``node_count``/``params`` before and after, and
    ``before_graph`` (the full ``before`` description, so renderers given only the
    ``after`` description can still draw what was removed).
    """
    b_groups, a_groups = _groups(before), _groups(after)
    status_b: dict[str, str] = {}
    status_a: dict[str, str] = {}
    pairs: list[list[str]] = []
    changes: dict[str, dict[str, list[Any]]] = {}

    for key in list(dict.fromkeys([*b_groups, *a_groups])):
        bs, as_ = b_groups.get(key, []), a_groups.get(key, [])
        matcher = difflib.SequenceMatcher(None, [_signature(n) for n in bs],
                                          [_signature(n) for n in as_], autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag == "equal":
                for b, a in zip(bs[i1:i2], as_[j1:j2]):
                    status_b[b["id"]] = status_a[a["id"]] = "kept"
                    pairs.append([b["id"], a["id"]])
                continue
            paired = min(i2 - i1, j2 - j1)
            for b, a in zip(bs[i1:i1 + paired], as_[j1:j1 + paired]):
                status_b[b["id"]] = status_a[a["id"]] = "changed"
                pairs.append([b["id"], a["id"]])
                changes[a["id"]] = {f: [b.get(f), a.get(f)] for f in COMPARED
                                    if b.get(f) != a.get(f)}
            for b in bs[i1 + paired:i2]:
                status_b[b["id"]] = "removed"
            for a in as_[j1 + paired:j2]:
                status_a[a["id"]] = "added"

    b_nodes = {n["id"]: n for n in before["nodes"]}
    a_nodes = {n["id"]: n for n in after["nodes"]}
    summary = dict.fromkeys(STATUSES, 0)
    weights = dict.fromkeys(STATUSES, 0)
    by_op: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(STATUSES, 0))

    def count(node: dict, status: str) -> None:
        if node["op"] == "call_function":
            summary[status] += 1
            by_op[node["target"]][status] += 1
        elif node["op"] == "get_attr":
            weights[status] += 1

    for nid, status in status_a.items():
        count(a_nodes[nid], status)
    for nid, status in status_b.items():
        if status == "removed":
            count(b_nodes[nid], status)

    return {
        "before": _head(before),
        "after": _head(after),
        "status": {"before": status_b, "after": status_a},
        "pairs": pairs,
        "changes": changes,
        "rows": _rows(before, after, pairs, status_b, status_a),
        "summary": summary,
        "weights": weights,
        "by_op": {op: by_op[op] for op in sorted(by_op)},
        "node_count": {"before": before["stats"]["nodes"], "after": after["stats"]["nodes"]},
        "params": {"before": before["stats"]["params"], "after": after["stats"]["params"]},
        "before_graph": before,
    }


def summary_line(d: dict) -> str:
    """``compute nodes 20 -> 19: 17 kept, 1 added, 2 removed, 1 changed``."""
    s = d["summary"]
    return (f"compute nodes {d['node_count']['before']} -> {d['node_count']['after']}: "
            + ", ".join(f"{s[k]} {k}" for k in STATUSES))


def op_changes(d: dict) -> list[tuple[str, str]]:
    """Per op with any change: (op, ``+1 -2 ~1``), most changed first."""
    out = []
    for op, c in d["by_op"].items():
        parts = [f"{sign}{c[k]}" for sign, k in (("+", "added"), ("-", "removed"),
                                                ("~", "changed")) if c[k]]
        if parts:
            out.append((c["added"] + c["removed"] + c["changed"], op, " ".join(parts)))
    return [(op, text) for _, op, text in sorted(out, key=lambda t: (-t[0], t[1]))]


def _head(desc: dict) -> dict:
    return {"title": desc.get("title", ""), "source": desc.get("source", ""),
            "stats": desc["stats"]}


def _groups(desc: dict) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for node in desc["nodes"]:
        groups[(node["module"], node["target"])].append(node)
    return groups


def _signature(node: dict) -> str:
    sig = {f: node.get(f) for f in COMPARED}
    if node["op"] in ("get_attr", "placeholder"):
        # Weights and inputs have stable names that say what they are.
        sig["name"] = node.get("attr_path", node["id"])
    return json.dumps(sig, sort_keys=True, default=str)


def _rows(before: dict, after: dict, pairs: list[list[str]], status_b: dict[str, str],
          status_a: dict[str, str]) -> list[dict]:
    """Both graphs as one list: ``after`` order, removed nodes after their last kept
    predecessor (in ``before`` order)."""
    partner = {b: a for b, a in pairs}
    after_pos = {n["id"]: i for i, n in enumerate(after["nodes"])}
    anchored: dict[int, list[str]] = defaultdict(list)
    anchor = -1
    for node in before["nodes"]:
        if node["id"] in partner:
            anchor = after_pos[partner[node["id"]]]
        elif status_b.get(node["id"]) == "removed":
            anchored[anchor].append(node["id"])
    back = {a: b for b, a in pairs}
    rows = [{"status": "removed", "before": b, "after": None} for b in anchored[-1]]
    for i, node in enumerate(after["nodes"]):
        rows.append({"status": status_a[node["id"]], "before": back.get(node["id"]),
                     "after": node["id"]})
        rows.extend({"status": "removed", "before": b, "after": None} for b in anchored[i])
    return rows
