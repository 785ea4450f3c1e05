"""How `flux migrate` shows itself: the dry run's plan and preflight, and live progress."""

import sys

import click


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def render_dry_run(r: dict) -> None:
    plan, pre = r["plan"], r["preflight"]
    click.echo(f"Plan ({plan['kind']}): {' → '.join(plan['steps'])}")
    for number, step in enumerate(plan.get("detail") or [], 1):
        where = " (cutover)" if step["cutover"] else " (after cutover: forward only)" if step["afterCutover"] else ""
        click.echo(f"  {number:>2}. {step['name']}{where}: {step['guarantee']}")
        if step["undo"]:
            click.echo(f"      on failure: {step['undo']}")
    click.echo(f"  target: {plan['target']} on docker host {plan['docker_host'] or '?'}, "
               f"Postgres {pre.get('target_postgres_major') or '?'}; Service URL stays {plan['service_url']}")
    click.echo(f"Preflight of {pre['schema']} (db host {pre['db_host']}):")
    for t in pre["tables"]:
        click.echo(f"  table {t['name']:<30} {t['rows']:>10} rows {size(t['bytes']):>10}"
                   f"{'' if t['rls'] else '  (no RLS)'}")
    for seq in pre["sequences"]:
        click.echo(f"  sequence {seq['name']} at {seq['last_value']}")
    click.echo(f"  extensions: {', '.join(pre['extensions']) or 'none'}")
    click.echo(f"  ledger: {len(pre['ledger'])} applied file(s); roles in policies: "
               f"{', '.join(pre['policy_roles']) or 'none'}")
    for host, tools in pre["tools"].items():
        click.echo(f"  tools on {host}: " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in tools.items()))
    click.echo(f"  data: {size(pre['total_bytes'])}; free for the dump: {size(pre['spool_free_bytes'])}; "
               f"estimated duration: {pre['estimated_seconds']:.0f}s")
    for warning in pre["warnings"]:
        click.secho(f"  warning: {warning}", fg="yellow")
    for error in pre["errors"]:
        click.secho(f"  error: {error}", fg="red")


STEP_MARKS = {"done": "done", "current": "running", "failed": "FAILED", "undone": "undone", "left": "-"}


def render_migration_status(r: dict) -> None:
    """A migration's plan with each step done, running, failed or left."""
    click.echo(f"Migration {r['migrationId']} ({r['kind']}): {r['state']}, started {r['startedAt'][:19]}"
               + (f", finished {r['finishedAt'][:19]}" if r.get("finishedAt") else ""))
    for step in r["steps"]:
        click.echo(f"  {step['name']:<12} {STEP_MARKS[step['status']]}")
    if r.get("sync"):
        lag = r["sync"]
        click.echo(f"  sync lag: {size(lag['lagBytes'])} of WAL, {lag['lagSeconds']:.1f}s "
                   f"({lag['transactions']} transactions applied)")
    staged = r.get("stagedSync")
    if staged:
        click.echo("  staged sync: " + (f"running, lag {size(staged.get('lagBytes') or 0)} of WAL, "
                                        f"{staged.get('lagSeconds') or 0:.1f}s" if staged.get("active")
                                        else f"ended ({staged.get('ended')})"))
    if r.get("error"):
        click.echo(f"  error: {r['error']}")


class MigrateProgress:
    """One line per phase; on a terminal, a live bar for the data move."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.phase = None

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "status":
            render_migration_status(event)
        elif kind == "phase":
            self._end_bar()
            self.phase = event["phase"]
            click.echo(f"• {self.phase}", err=True)
        elif kind == "progress":
            done, total, unit = event.get("done", 0), event.get("total", 0), event.get("unit", "")
            if unit == "bytes":
                text = f"  {event.get('phase')}: {size(done)} of {size(total)}"
            else:
                text = f"  {event.get('phase')}: {done}/{total} {unit} {event.get('message', '')}".rstrip()
            if self.tty and total:
                width = 30
                filled = int(width * min(done, total) / total)
                click.echo(f"\r{text:<60} [{'#' * filled}{'.' * (width - filled)}]", err=True, nl=False)
            elif not self.tty and unit != "bytes":
                click.echo(text, err=True)
        elif kind == "result":
            self._end_bar()

    def _end_bar(self) -> None:
        if self.tty:
            click.echo("", err=True)
