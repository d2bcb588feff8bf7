"""Look inside a running buffer, or a finished run's buffer snapshot.

    python -m buffer.inspect --addr tcp://127.0.0.1:5555 summary          # counters, queue, staleness histogram
    python -m buffer.inspect --addr tcp://127.0.0.1:5555 prompts --top 20 # per-prompt table (priority, skip state)
    python -m buffer.inspect --addr tcp://127.0.0.1:5555 leases           # live leases, training and evaluation
    python -m buffer.inspect --addr tcp://127.0.0.1:5555 queue            # groups waiting for the learner
    python -m buffer.inspect --addr tcp://127.0.0.1:5555 watch            # live refreshing summary (Ctrl-C quits)
    python -m buffer.inspect --snapshot runs/x/buffer_snapshot.msgpack plot --out buffer.png

`--json` prints the raw payload (summary, prompts, leases or queue) for scripts. CURVE-protected buffers take
`--curve-server-key FILE --curve-client-secret FILE` (see `python -m buffer.keys`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table


class SnapshotSource:
    """Reads a snapshot file with the buffer's own state code (no server needed)."""

    def __init__(self, path: str):
        from buffer.state import BufferState, decode_snapshot

        snap = decode_snapshot(Path(path).read_bytes(), source=path)
        self.saved_at = snap.saved_at
        self.state = BufferState.from_snapshot(snap)

    def stats(self) -> dict[str, Any]:
        return self.state.stats_dict(0.0)

    def prompts(self, top: int) -> list[dict[str, Any]]:
        return self.state.prompt_rows(top)

    def rows(self, what: str, top: int) -> list[dict[str, Any]]:
        """`leases` (none: a snapshot's in-flight leases are pending work again) or `queue`."""
        return self.state.inspect(what, top, 0.0)


class LiveSource:
    def __init__(self, address: str, timeout_s: float, server_key: str, client_secret: str):
        from buffer.client import BufferClient

        self.client = BufferClient(address, timeout_s=timeout_s, retries=0, curve_server_public_key_file=server_key,
                                   curve_client_secret_key_file=client_secret)

    def stats(self) -> dict[str, Any]:
        return self.client.stats()

    def prompts(self, top: int) -> list[dict[str, Any]]:
        return self.client.inspect("prompts", top)

    def rows(self, what: str, top: int) -> list[dict[str, Any]]:
        return self.client.inspect(what, top)


# ---------------------------------------------------------------------------------------------- rendering


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_table(stats: dict[str, Any], rates: dict[str, float] | None = None) -> Group:
    """Two tables: the headline gauges/counters and the staleness histogram of served groups."""
    main = Table(title=f"buffer — policy version {stats['policy_version']}, epoch {stats['epoch']} "
                       f"({100 * stats['epoch_progress']:.0f}% through)", show_header=False)
    main.add_column("quantity", style="bold")
    main.add_column("value", justify="right")
    main.add_column("quantity", style="bold")
    main.add_column("value", justify="right")
    rates = rates or {}
    uptime = stats.get("uptime_s") or 0.0
    recv_rate = rates.get("groups_received", stats["groups_received"] / uptime if uptime else 0.0)
    serve_rate = rates.get("groups_served", stats["groups_served"] / uptime if uptime else 0.0)
    rejected = stats["groups_rejected"]
    rows = [
        ("queue depth", stats["queue_depth"], "groups received", stats["groups_received"]),
        ("prompts in flight", stats["in_flight"], "groups served", stats["groups_served"]),
        ("live leases", stats["live_leases"], "zero-variance dropped", stats["groups_zero_variance"]),
        ("admission room", stats["admission_room"], "stale dropped", stats["groups_dropped_stale"]),
        ("leases granted", stats["leases_granted"], "rejected",
         f"{sum(rejected.values())} " + (json.dumps(rejected) if rejected else "")),
        ("leases expired", stats["leases_expired"], "bad messages", stats["messages_bad"]),
        ("leases released", stats["leases_released"], "lease waits", json.dumps(stats["lease_waits"])),
        ("received groups/s", f"{recv_rate:.1f}", "served groups/s", f"{serve_rate:.1f}"),
        ("prompts", stats["prompts"], "clients", json.dumps(stats.get("clients", {}))),
        ("informative yield", _fmt(stats.get("informative_yield")), "snapshot failures",
         stats.get("snapshot_failures", 0)),
        ("prompt skipping", "on" if stats.get("prompt_skipping") else "off", "skip probability",
         _fmt(stats.get("skip_probability"))),
        ("prompts skipped", stats.get("prompts_skipped", 0), "revisited (paid off)",
         f"{stats.get('prompts_revisited', 0)} ({stats.get('revisits_informative', 0)})"),
    ]
    for row in rows:
        main.add_row(*(str(x) for x in row))
    if stats.get("low_yield_warning"):
        main.caption = f"[bold yellow]{stats['low_yield_warning']}[/]"
    hist = Table(title="staleness of served groups")
    hist.add_column("staleness", justify="right")
    hist.add_column("groups", justify="right")
    hist.add_column("")
    counts = {int(k): v for k, v in stats["staleness_hist"].items()}
    peak = max(counts.values(), default=1)
    for staleness in sorted(counts):
        hist.add_row(str(staleness), str(counts[staleness]), "█" * max(1, round(30 * counts[staleness] / peak)))
    return Group(main, hist)


def prompts_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"prompts by priority ({len(rows)} shown)")
    for name in ("prompt_id", "G", "k", "success", "variance", "priority", "last n", "recent n", "leases",
                 "zv streak", "skips", "since seen", "p skip"):
        table.add_column(name, justify="left" if name == "prompt_id" else "right")
    for r in rows:
        table.add_row(r["prompt_id"], _fmt(r["G"], 1), _fmt(r["k"], 1), _fmt(r["success"]), _fmt(r["variance"]),
                      _fmt(r["priority"], 4), str(r["last_n"]), " ".join(map(str, r["allocations"][-6:])),
                      str(r["leases"]), _fmt(r.get("zero_variance_streak")),
                      f"{r.get('skips_in_row', 0)}/{r.get('skips', 0)}", _fmt(r.get("waves_since_seen")),
                      _fmt(r.get("skip_probability"), 2))
    return table


ROW_COLUMNS = {
    "leases": ("lease_id", "kind", "actor_id", "policy_version", "open", "done", "seconds_left"),
    "queue": ("prompt_id", "arrival", "samples", "min_version", "staleness"),
}


def rows_table(what: str, rows: list[dict[str, Any]]) -> Table:
    """`leases` (an evaluation lease's policy_version is the version it evaluates) or `queue` as a table."""
    table = Table(title=f"{what} ({len(rows)} shown)")
    for name in ROW_COLUMNS[what]:
        table.add_column(name, justify="left" if name in ("kind", "actor_id", "prompt_id") else "right")
    for r in rows:
        table.add_row(*(_fmt(r.get(name), 1) for name in ROW_COLUMNS[what]))
    return table


def plot(stats: dict[str, Any], rows: list[dict[str, Any]], out: str) -> None:
    """Write `figure` to `out`."""
    import matplotlib.pyplot as plt

    fig = figure(stats, rows)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def figure(stats: dict[str, Any], rows: list[dict[str, Any]]) -> Any:
    """Histograms of known priorities, of each prompt's latest allocation n, of served-group staleness, and the
    skip state per prompt (zero-variance streak against times skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    priorities = [r["priority"] for r in rows if r["priority"] >= 0]
    axes[0].hist(priorities, bins=30, color="tab:blue")
    unknown = sum(1 for r in rows if r["priority"] < 0)
    axes[0].set(title=f"priority of known prompts ({unknown} unknown)", xlabel="priority", ylabel="prompts")
    last_n = [r["last_n"] for r in rows if r["last_n"] > 0]
    if last_n:
        axes[1].hist(last_n, bins=range(min(last_n), max(last_n) + 2), color="tab:green", align="left")
    axes[1].set(title="latest allocation per prompt", xlabel="n (rollouts)", ylabel="prompts")
    hist = {int(k): v for k, v in stats["staleness_hist"].items()}
    axes[2].bar(list(hist), list(hist.values()), color="tab:orange")
    axes[2].set(title="staleness of served groups", xlabel="policy versions behind", ylabel="groups")
    _skip_panel(axes[3], stats, rows)
    fig.suptitle(f"buffer at policy version {stats['policy_version']}, epoch {stats['epoch']}")
    fig.tight_layout()
    return fig


def _skip_panel(ax: Any, stats: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """One dot per prompt: zero-variance streak against times skipped, coloured by the next skip probability."""
    streak = [r.get("zero_variance_streak", 0) for r in rows]
    skips = [r.get("skips", 0) for r in rows]
    points = ax.scatter(streak, skips, c=[r.get("skip_probability", 0.0) for r in rows], cmap="viridis",
                        vmin=0.0, vmax=1.0, s=12)
    ax.figure.colorbar(points, ax=ax, label="next skip probability")
    state = "on" if stats.get("prompt_skipping") else "off"
    ax.set(title=f"skip state per prompt (skipping {state}, {stats.get('prompts_skipped', 0)} skipped)",
           xlabel="zero-variance groups in a row", ylabel="times skipped")


# ---------------------------------------------------------------------------------------------- commands


def watch(source: LiveSource, interval_s: float, iterations: int, console: Console) -> None:
    """Refresh the summary; rates are deltas between refreshes."""
    previous, previous_t = source.stats(), time.monotonic()
    with Live(summary_table(previous), console=console, refresh_per_second=4) as live:
        done = 0
        while iterations <= 0 or done < iterations:
            time.sleep(interval_s)
            stats, now = source.stats(), time.monotonic()
            dt = max(1e-9, now - previous_t)
            rates = {k: (stats[k] - previous[k]) / dt for k in ("groups_received", "groups_served")}
            live.update(summary_table(stats, rates))
            previous, previous_t = stats, now
            done += 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m buffer.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--addr", help="address of a running buffer, e.g. tcp://127.0.0.1:5555")
    where.add_argument("--snapshot", help="a buffer snapshot file (buffer_snapshot.msgpack)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the buffer")
    parser.add_argument("--curve-server-key", default="", help="server public key file (CURVE)")
    parser.add_argument("--curve-client-secret", default="", help="client secret key file (CURVE)")
    parser.add_argument("command", choices=("summary", "prompts", "leases", "queue", "watch", "plot"))
    parser.add_argument("--top", type=int, default=20, help="prompts, leases, queue: rows to show (0 = all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table (not watch, plot)")
    parser.add_argument("--out", default="buffer.png", help="plot: output image")
    parser.add_argument("--interval", type=float, default=2.0, help="watch: seconds between refreshes")
    parser.add_argument("--iterations", type=int, default=0, help="watch: stop after this many refreshes (0 = never)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0; 1 when the buffer cannot be reached or the snapshot cannot be read (the reason on stderr)."""
    from buffer.client import BufferError

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args, Console())
    except (BufferError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, console: Console) -> int:
    if args.snapshot:
        source: Any = SnapshotSource(args.snapshot)
    else:
        source = LiveSource(args.addr, args.timeout, args.curve_server_key, args.curve_client_secret)
    if args.command == "summary":
        stats = source.stats()
        console.print_json(json.dumps(stats)) if args.json else console.print(summary_table(stats))
    elif args.command == "prompts":
        rows = source.prompts(args.top)
        console.print_json(json.dumps(rows)) if args.json else console.print(prompts_table(rows))
    elif args.command in ROW_COLUMNS:
        rows = source.rows(args.command, args.top)
        console.print_json(json.dumps(rows)) if args.json else console.print(rows_table(args.command, rows))
    elif args.command == "plot":
        plot(source.stats(), source.prompts(0), args.out)
        console.print(f"wrote {args.out}")
    elif isinstance(source, SnapshotSource):
        console.print("watch needs a live buffer (--addr)")
        return 2
    else:
        try:
            watch(source, args.interval, args.iterations, console)
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a user leaves the live view
    return 0


if __name__ == "__main__":
    sys.exit(main())
