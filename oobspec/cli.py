"""`oob` — parse arguments, call the library, print. No logic lives here."""
from __future__ import annotations

import json
import os
import sys

import click

from . import report
from .errors import OobError, SpecError

values_option = click.option("--values", "-f", "value_files", multiple=True, type=click.Path(dir_okay=False),
                             help="Values file (YAML); repeatable, later files win.")
set_option = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                          help="Set a value (YAML-typed, dotted keys); wins over values files.")
address_option = click.option("--address", default=None, metavar="ADDR",
                              help="Ray cluster address (default: RAY_ADDRESS, then the spec's ray.address).")


def _via_jobs(address, argv: list[str], spec=None) -> None:
    """With a Ray Jobs address (http://HEAD:8265), the command runs on the cluster as a job:
    its output streams here and its exit code is ours."""
    from .control.jobs import forward, jobs_address
    url = jobs_address(address, spec)
    if url:
        sys.exit(forward(url, argv, spec))


def _load(spec_path: str, value_files, sets, warn: bool = True):
    """The spec, rendered and validated; rendering's warnings (an unread `--set` key) go to
    stderr, unless the command prints them with its lint warnings (`apply`)."""
    from .api import load
    loaded = load(spec_path, value_files=value_files, sets=sets)
    for warning in getattr(loaded._source.document, "warnings", []) if warn else ():
        click.echo(str(warning), err=True)
    return loaded


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks.")
@click.version_option(package_name="oobspec")
@click.pass_context
def cli(ctx, debug):
    """Declare Ray actors' out-of-band servers, wrapped processes and buffer links; apply them."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path())
@values_option
@set_option
@click.option("--no-import", is_flag=True, help="Skip importing classes (checks method names too).")
@click.option("--strict", is_flag=True, help="Warnings count as errors.")
@click.option("-o", "--output", "fmt", type=click.Choice(["text", "json", "github"]), default="text")
def lint(specs, value_files, sets, no_import, strict, fmt):
    """Check spec files: one line per problem, file:line:col: CODE message."""
    from .api import lint_file
    diags = []
    for path in specs:
        diags += lint_file(path, value_files=value_files, sets=sets, imports=not no_import)
    text = report.diagnostics(diags, fmt)
    if fmt == "json":
        click.echo(text)
    else:
        if text:
            click.echo(text)
        click.echo(report.summary(diags, len(specs)), err=True)
    failed = any(d.is_error for d in diags) or (strict and diags)
    sys.exit(1 if failed else 0)


@cli.command()
@click.argument("spec", type=click.Path())
@values_option
@set_option
def render(spec, value_files, sets):
    """Print the rendered spec (templates evaluated, `when: false` items left out) as YAML."""
    from .render import to_yaml
    loaded = _load(spec, value_files, sets)
    click.echo(to_yaml(loaded._source.document.data), nl=False)


@cli.command()
@click.argument("spec", type=click.Path())
@values_option
@set_option
@address_option
@click.option("-o", "--output", "fmt", type=click.Choice(["text", "json"]), default="text")
def plan(spec, value_files, sets, address, fmt):
    """Show what apply would change (offline when no cluster is running)."""
    from .control.commands import plan_for
    loaded = _load(spec, value_files, sets)
    _via_jobs(address, ["plan", "{spec}", "-o", fmt], loaded)
    result = plan_for(loaded, address)
    click.echo(json.dumps(result.to_dict(), indent=2) if fmt == "json" else report.plan_text(result))


@cli.command()
@click.argument("spec", type=click.Path())
@values_option
@set_option
@address_option
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for every server to be healthy.")
@click.option("--atomic", is_flag=True,
              help="On failure, return every actor to the revision that ran before (rolling) and exit 1.")
def apply(spec, value_files, sets, address, timeout, atomic):
    """Make the Ray cluster match the spec. Without an address: start a local Ray, run in the foreground.

    Whatever fails, what ran before keeps running (at its old or new version); the error says
    which replica runs which, and applying again continues from there."""
    from .control.foreground import apply_cli
    loaded = _load(spec, value_files, sets, warn=False)
    _via_jobs(address, ["apply", "{spec}", "--timeout", str(timeout)] + (["--atomic"] if atomic else []), loaded)
    apply_cli(loaded, address=address, timeout=timeout, atomic=atomic)


@cli.command()
@click.argument("spec", type=click.Path())
@values_option
@set_option
@address_option
def diff(spec, value_files, sets, address):
    """Show what apply would change: the running revision's rendered spec against SPEC's, and
    actors whose code changed. Exit 1 when they differ (nothing deployed: everything is new)."""
    from .control.rollouts import diff as spec_diff
    loaded = _load(spec, value_files, sets)
    _via_jobs(address, ["diff", "{spec}"], loaded)
    text = spec_diff(loaded, address)
    click.echo(text, nl=False)
    sys.exit(1 if text else 0)


@cli.command()
@click.argument("name")
@address_option
@click.option("-o", "--output", "fmt", type=click.Choice(["text", "json"]), default="text")
def history(name, address, fmt):
    """List a deployment's revisions: every apply, rollback and restart, and which one runs."""
    from .control.rollouts import history_of
    _via_jobs(address, ["history", name, "-o", fmt])
    found = history_of(name, address)
    click.echo(json.dumps(found, indent=2) if fmt == "json" else report.history_text(found))


def _progress():
    from rich.console import Console
    console = Console(stderr=True, highlight=False, soft_wrap=True)  # a pipe or CI log: never wrapped
    return lambda msg: console.print(f"[dim]·[/dim] {msg}")


@cli.command()
@click.argument("name")
@click.argument("revision", type=int, required=False)
@address_option
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for every server to be healthy.")
def rollback(name, revision, address, timeout):
    """Deploy revision REVISION again (default: the one before the current one), rolling; from
    the cluster's record, so the spec's files need not exist. On failure, back where it was."""
    from .control.rollouts import rollback as roll_back
    _via_jobs(address, ["rollback", name] + ([str(revision)] if revision is not None else [])
              + ["--timeout", str(timeout)])
    click.echo(report.endpoints_text(roll_back(name, revision, address, _progress(), timeout)))


@cli.command()
@click.argument("name")
@click.argument("actor", required=False)
@address_option
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for every server to be healthy.")
def restart(name, actor, address, timeout):
    """Replace every replica of the running revision (or of ACTOR), one at a time: rolling where
    the actor can roll."""
    from .control.rollouts import restart as do_restart
    _via_jobs(address, ["restart", name] + ([actor] if actor else []) + ["--timeout", str(timeout)])
    click.echo(report.endpoints_text(do_restart(name, actor, address, _progress(), timeout)))


@cli.command()
@click.argument("name")
@address_option
@click.option("-o", "--output", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("--watch", "-w", is_flag=True,
              help="Refresh until Ctrl-C: per replica req/s, p50/p99, errors, link versions and GB/s.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.2),
              help="Seconds between refreshes with --watch.")
def status(name, address, fmt, watch, interval):
    """Show a deployment's replicas, endpoints, links and where its metrics are scraped."""
    from .control.commands import status as get_status
    _via_jobs(address, ["status", name, "-o", fmt] + (["--watch", "--interval", str(interval)] if watch else []))
    if watch:
        from .control.watch import watch as views
        try:
            _show_views(views(name, address, interval), fmt)
        except KeyboardInterrupt:  # Ctrl-C is how a watch ends: exit 0
            pass
        return
    result = get_status(name, address)
    click.echo(json.dumps(result, indent=2) if fmt == "json" else report.status_text(result))


def _show_views(views, fmt: str) -> None:
    """On a terminal, one live table in place; through a pipe (or as JSON, one object a line), every refresh."""
    if fmt == "text" and sys.stdout.isatty():
        from rich.live import Live
        from rich.text import Text
        with Live(auto_refresh=False) as live:
            for view in views:
                live.update(Text(report.watch_text(view), no_wrap=True, overflow="crop"), refresh=True)
    else:
        for view in views:
            click.echo(json.dumps(view) if fmt == "json" else report.watch_text(view) + "\n")


@cli.command()
@click.argument("spec", type=click.Path())
@values_option
@set_option
@click.option("-o", "--output", "fmt", type=click.Choice(["mermaid", "dot"]), default="mermaid", show_default=True)
def graph(spec, value_files, sets, fmt):
    """Draw the spec's topology (no cluster): actors, servers, connect edges and links."""
    from .graph import render as draw
    click.echo(draw(_load(spec, value_files, sets), fmt), nl=False)


@cli.command()
@click.argument("name")
@click.argument("link")
@address_option
def sync(name, link, address):
    """Push a link's source buffer into every target now."""
    from .control.commands import sync as do_sync
    _via_jobs(address, ["sync", name, link])
    result = do_sync(name, link, address)
    click.echo(f"{link}: version {result['version']}, {report.size(result['bytes'])} to "
               f"{result['targets']} target{'s' if result['targets'] != 1 else ''} in {result['seconds'] * 1000:.1f} ms "
               f"({result['gbps']:.2f} GB/s, {result['transport']})")


@cli.command()
@click.argument("target", metavar="NAME|SPEC")
@values_option
@set_option
@address_option
def delete(target, value_files, sets, address):
    """Delete a deployment: its actors, servers, processes and shared memory. A SPEC is rendered
    with --values / --set first, as apply rendered it (its name may be a template)."""
    from .control.commands import delete as do_delete
    name, loaded = target, None
    if target.endswith((".yaml", ".yml")) or os.path.sep in target:
        loaded = _load(target, value_files, sets)
        name = loaded.name
    elif value_files or sets:
        raise click.UsageError("--values and --set need a SPEC file, not a deployment name")
    _via_jobs(address, ["delete", name], loaded)
    removed = do_delete(name, address, loaded.ray.address if loaded else None)
    click.echo(f"deleted {name}: {removed} actor{'s' if removed != 1 else ''}")


@cli.command()
@click.argument("name")
@click.argument("actor", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output.")
@click.option("--tail", type=click.IntRange(min=0), default=None, metavar="N",
              help="Only the last N lines of each replica's output so far.")
@click.option("--since", default=None, metavar="DURATION", help="Only output of the last 30s, 5m, 2h, 1d...")
@address_option
def logs(name, actor, follow, tail, since, address):
    """Print an actor's output (its wrapped process's too). ACTOR: <actor> or <actor>-<i>."""
    from .control.commands import logs as stream_logs, parse_duration
    seconds = parse_duration(since) if since is not None else None
    _via_jobs(address, ["logs", name] + ([actor] if actor else []) + (["-f"] if follow else [])
              + (["--tail", str(tail)] if tail is not None else []) + (["--since", since] if since else []))
    for chunk in stream_logs(name, actor, follow, address, tail=tail, since=seconds):
        click.echo(chunk, nl=False)


@cli.command(name="list")
@address_option
@click.option("-o", "--output", "fmt", type=click.Choice(["text", "json"]), default="text")
def list_(address, fmt):
    """List the deployments on the cluster (without an address: the clusters on this machine)."""
    from .control.commands import deployments
    _via_jobs(address, ["list", "-o", fmt])
    found = deployments(address)
    click.echo(json.dumps(found, indent=2) if fmt == "json" else report.deployments_text(found))


@cli.command()
def schema():
    """Print the spec's JSON Schema."""
    from .schema import json_schema
    click.echo(json.dumps(json_schema(), indent=2))


def main(argv=None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    from .control.connect import take_sigterm
    take_sigterm()
    try:
        cli.main(args=argv, prog_name="oob", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors
        exc.show()
        sys.exit(2)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except SpecError as exc:
        if debug:
            raise
        click.echo(report.diagnostics(exc.diagnostics), err=True)
        sys.exit(exc.exit_code)
    except OobError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        if getattr(exc, "hard_exit", False):  # a call into Ray still hangs in a thread: do not wait for it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.exit_code)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a bug of ours: still one line, unless --debug
        if debug:
            raise
        click.echo(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
