"""Text for people: diagnostics, plans, status and endpoint tables. Pure formatting, no I/O."""
from __future__ import annotations

import json

from .errors import Diagnostic
from .nodes import size
from .plan import Plan


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers)] + [line(r) for r in cells])


def diagnostics(diags: list[Diagnostic], fmt: str = "text") -> str:
    if fmt == "json":
        return json.dumps([d.to_dict() for d in diags], indent=2)
    if fmt == "github":
        def esc(s: str) -> str:
            return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")

        def prop(s: str) -> str:  # workflow-command properties also escape ':' and ','
            return esc(s).replace(":", "%3A").replace(",", "%2C")
        return "\n".join(
            f"::{d.severity} file={prop(d.file)},line={d.line},col={d.col},title={prop(d.code)}::"
            f"{esc(d.message + (f' ({d.hint})' if d.hint else ''))}" for d in diags)
    return "\n".join(str(d) for d in diags)


def summary(diags: list[Diagnostic], files: int) -> str:
    errors = sum(d.is_error for d in diags)
    warnings = len(diags) - errors
    if not diags:
        return f"{files} spec{'s' if files != 1 else ''} ok"
    return f"{errors} error{'s' if errors != 1 else ''}, {warnings} warning{'s' if warnings != 1 else ''}"


_SIGN = {"create": "+", "replace": "~", "delete": "-", "keep": "="}


def plan_text(plan: Plan) -> str:
    out = [f"deployment {plan.name} (namespace {plan.namespace}) — "
           + ("compared with the running cluster" if plan.online else "offline: no cluster running, showing what apply would create")]
    out.append("")
    for a in plan.actions:
        replicas = ",".join(str(i) for i in a.replicas)
        out.append(f"  {_SIGN[a.kind]} {a.kind:<8} {a.actor} [{replicas}]  ({a.describe()})")
    changes = plan.changes
    counts = {k: sum(len(a.replicas) for a in changes if a.kind == k) for k in ("create", "replace", "delete")}
    out.append("")
    out.append(f"  {counts['create']} to create, {counts['replace']} to replace, {counts['delete']} to delete"
               if changes else "  no changes")
    out.append("")
    out.append("start order: " + " -> ".join("[" + ", ".join(w) + "]" for w in plan.waves))
    if plan.changes:
        out.append("steps: " + " -> ".join(f"{n}. {_stage_text(stage)}" for n, stage in enumerate(plan.stages(), 1)))
    if plan.servers:
        out.append("")
        out.append(table(["ACTOR", "REPLICA", "SERVER", "PROTOCOL", "ENDPOINT"],
                         [[s.actor, s.replica, s.server, s.protocol, s.url] for s in plan.servers]))
    if plan.links:
        out.append("")
        out.append(table(["LINK", "FROM", "TO", "DEVICE", "SIZE", "TRANSPORT", "WHY"],
                         [[x.name, x.source, x.target, x.device,
                           size(x.nbytes) + _COPIES.get(x.buffering, ""), *x.describe()]
                          for x in plan.links]))
    if plan.upload:
        up = plan.upload
        out.append("")
        out.append(f"upload: {up['folder']} ({up['files']} file{'s' if up['files'] != 1 else ''}, {size(up['bytes'])}) "
                   "as the actors' working_dir, with oobspec as a py_module")
    if plan.warnings:
        out += ["", "warnings:"] + [f"  ! {w}" for w in plan.warnings]
    r = plan.resources
    out.append("")
    out.append(f"total: {r['actors']} actor replica{'s' if r['actors'] != 1 else ''}, {r['cpus']:g} CPU, "
               f"{r['gpus']:g} GPU, {size(r['memory_bytes'])} memory")
    return "\n".join(out)


def _stage_text(stage: list) -> str:
    """`start a[0], b[0,1]`, as apply reports the stage."""
    if stage[0].actor is None:
        return str(stage[0].kind)
    return f"{stage[0].kind} " + ", ".join(f"{s.actor}[{','.join(map(str, s.replicas))}]" for s in stage)


def endpoints_text(endpoints: dict[str, dict[str, list[str]]]) -> str:
    rows = [[actor, server, i, url] for actor, servers in endpoints.items()
            for server, urls in servers.items() for i, url in enumerate(urls)]
    return table(["ACTOR", "SERVER", "REPLICA", "ENDPOINT"], rows) if rows else "(no servers)"


def status_text(status: dict) -> str:
    health = "healthy" if status["healthy"] else "NOT healthy"
    out = [f"deployment {status['name']} (namespace {status['namespace']}): {health}", ""]
    last = status["last_apply"]
    if last and not last["ok"]:  # what the failed apply left, until an apply completes
        out[-1:] = [f"last apply stopped at {last['step']}: {last['cause']}",
                    f"  new version: {', '.join(last['new']) or '-'}; previous version: {', '.join(last['old']) or '-'}",
                    ""]
    rows = [[r["name"], r["state"], _restarts(r), r["pid"] or "-", _node(r),
             f"pending: {r['pending']}" if "pending" in r else " ".join(r["endpoints"].values()) or "-"]
            for r in status["replicas"]]
    out.append(table(["ACTOR", "STATE", "RESTARTS", "PID", "NODE", "ENDPOINTS"], rows) if rows else "(no actors)")
    if status["links"]:
        out.append("")
        rows = []
        for link in status["links"]:
            last = link["last_push"]
            rows.append([link["name"], link["from"], ", ".join(link["to"]), link["transport"],
                         last["version"] if last else "-", size(last["bytes"]) if last else "-",
                         f"{last['gbps']:.2f}" if last else "-"])
        out.append(table(["LINK", "FROM", "TO", "TRANSPORT", "VERSION", "BYTES", "GB/S"], rows))
    out += metrics_lines(status["metrics"] if "metrics" in status else [])
    return "\n".join(out)


def metrics_lines(endpoints: list[dict]) -> list[str]:
    """Where Prometheus scrapes the `ray_oob_*` series: each node's Ray metrics export."""
    return [""] + [f"metrics: {m['url']}" for m in endpoints] if endpoints else []


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"


def _links_cell(links: list[dict]) -> str:
    cells = []
    for x in links:
        text = f"{x['link']} v{x['version']}"
        if x["role"] == "source":
            text += f" {x['gbps']:.2f} GB/s" if x["gbps"] is not None else ""
            text += f" {x['pushes_per_s']:.1f} push/s" if x["pushes_per_s"] else ""
        cells.append(text)
    return ", ".join(cells) or "-"


def watch_text(view: dict) -> str:
    """One refresh of `oob status --watch`: per replica, rates since the previous refresh."""
    health = "healthy" if view["healthy"] else "NOT healthy"
    head = f"deployment {view['name']}: {health}, {view['time']} (every {view['interval']:g}s, Ctrl-C to stop)"
    rows = [[r["name"], r["state"], _number(r["req_per_s"]) if r["metrics"] or r["state"] != "alive" else "off",
             _number(r["p50_ms"], " ms"), _number(r["p99_ms"], " ms"), _number(r["errors_4xx_per_s"]),
             _number(r["errors_5xx_per_s"]), r["requests"] if r["requests"] is not None else "-",
             _links_cell(r["links"])] for r in view["replicas"]]
    body = table(["REPLICA", "STATE", "REQ/S", "P50", "P99", "4XX/S", "5XX/S", "REQUESTS", "LINKS"], rows)
    return "\n".join([head, body, *metrics_lines(view["metrics"])])


def _node(row: dict) -> str:
    """The address Ray knows the replica's node by (rows from an older oobspec: its id's start)."""
    address = row["node_address"] if "node_address" in row else None
    return address or (row["node_id"] or "-")[:12]


def _restarts(row: dict) -> str:
    """The actor's restarts, and its wrapped command's (JSON: `process.starts`)."""
    process = row["process"] if "process" in row else None
    if not process:
        return str(row["restarts"])
    return f"{row['restarts']} (command: {process['starts'] - 1})"


def deployments_text(found: list[dict]) -> str:
    if not found:
        return "(no deployments)"
    return table(["NAME", "NAMESPACE", "ALIVE", "ADDRESS"],
                 [[d["name"], d["namespace"], f"{d['alive']}/{d['replicas']}", d["address"]] for d in found])


def history_text(found: dict) -> str:
    """`oob history`: one row per revision, oldest first, as `helm history` lists releases."""
    import time
    rows = [[r["number"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"])) if r["time"] else "-",
             r["by"] or "-", r["digest"], r["result"], "*" if r["current"] else "",
             (r["note"] or "apply") + (f": {r['message']}" if r["message"] else "")] for r in found["revisions"]]
    return table(["REVISION", "TIME", "BY", "DIGEST", "RESULT", "CURRENT", "DESCRIPTION"], rows)


_COPIES = {"double": " x2 (double)", "triple": " x3 (triple)"}  # what each target holds of a link
