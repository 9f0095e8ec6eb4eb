"""Benchmark: what the data plane costs per hop against raw sockets, and how close a 3-stage chain gets to its ideal.

Every comparison is measured side by side in one run: the contenders alternate over rounds (the order
rotates every round and flips every other round), and a ratio is the median over rounds of the same-round
ratio of the two contenders' medians; the range printed with it is the lowest and highest round's ratio.
Read only the ratios: on a shared box absolute times move from one minute to the next.

(1) **One hop round trip** on loopback, one float32 tensor of shape (1, n) at 64 KiB, 1 MiB and 4 MiB. The
    servers run in a process of their own (one for plain text, one for mutual TLS), as the next node would:

    * *ours*, the runtime's real path: ``encode_tensors`` with the raw codec -> ``RemoteStage.send`` (no link
      emulated, so it writes to its ``FrameConnection`` at once, with ``sendmsg``) -> a real
      ``Node`` (``Node.start``: gRPC Health for the data port, then HELLO/WELCOME, credits, its
      ``DataService``) whose plan for that size serves a stage taking exactly that tensor. The node runs
      ``read_batch`` and ``decode_batch`` as always (on its loop: a raw payload is wrapped, not copied);
      the stage itself is a stand-in that answers each row at once (a ``RowResult`` of 10 logits), so no
      model compute is timed. The answer goes up as a RESULTS frame, in one write with the batch's CREDIT,
      and ``RemoteStage`` resolves the row's future. Timed from before ``encode`` to the future's result.
      The stand-in is injected into ``node.plans`` (a stage file per size would only add model loading,
      not transport).
    * *raw TCP*: a blocking socket; an 8-byte length prefix, then the tensor's bytes from its own memory;
      the server thread ``recv_into`` a preallocated buffer, ``torch.frombuffer`` on it, replies 8 bytes.
    * *frames* (diagnostic): ``FrameConnection`` alone, a BATCH frame with a 64-byte metadata block to an
      echo server (``torch.frombuffer`` on the payload, a 2-byte RESULTS frame back): what the connection
      costs without ``RemoteStage`` and ``DataService`` around it.
    * the same three under mutual TLS (``client_tls``/``server_tls``, the cluster CA, node certificates):
      *ours+tls* (``security.tls`` in the node's cluster, RemoteStage with the edge's certificate),
      *raw TLS* (the raw contender over :mod:`ssl` sockets), *frames+tls*.

    p50 is the median over every timed message of a contender; targets: ours <= 1.2x raw TCP at 1 and 4 MiB,
    ours+tls <= 1.3x raw TLS.

(2) **Pipelined**: 4 x 1 MiB in flight (4 sends, then the 4 answers), throughput in MB/s; ratio ours/raw.

(3) **3-stage chain vs its ideal**: edge + cloud1 + cloud2 over digits_cnn with random weights and an
    uncalibrated policy (every input runs all three stages), raw codec, window 16, saved as a model package
    (``splitexit.save``) that every node loads. By default (``--processes``) cloud1 and cloud2 are node
    processes started by ``LocalCluster`` from a cluster file (``package:``, per-node ``slowdown``, a
    cluster token, free loopback ports), as deployed; the edge is an ``Entry`` in this process
    (``--in-process``: all three nodes in this process; ``--both``: both). Each node's ``slowdown``
    stretches its batch-1 stage to about 1, 3 and 10 ms (``--stage-ms``), for max_batch 1 and 8
    (``--max-batch``); the slowdowns are calibrated on stages run alone here, then corrected twice from
    batch-1 chain runs (the stage times inside the chain, below). The ideal is taken
    from the same run: every answer carries each node's ``compute_start``/``compute_end`` stamps back, so
    the bench knows how long each stage's batches took *inside the chain* (slowdown included) and how many
    rows they held; ideal = min(rows / seconds of the busiest stage, window / sum of the stages' batch
    seconds): the busiest stage never idle, or the window if it cannot keep every stage busy. What is left
    between measured and ideal is the runtime: transport, queues, scheduling. (Stage times alone are no
    ideal here: a 0.1 ms digits stage stretched by a slowdown of 20-30 runs 3-10x slower after each sleep
    than back to back, so timings alone and inside the chain disagree by more than the effect measured.)
    Medians over rounds are reported.

(4) **The chain's zero-compute ceiling**: the same chain, same mode, slowdown 1 everywhere, inputs/s, at each
    max_batch, with 8 batches in flight (window 8 x max_batch, at least 16) so that neither the window nor
    the pipeline's depth is the limit: what the runtime itself can move here.

Run ``.venv/bin/python bench/transport.py`` (``--quick``: fewer rounds and inputs). Parts 1-2 live in
``transport_hop.py``, parts 3-4 in ``transport_chain.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from transport_chain import STARTS, digits_package, measure_chains, report_chains
from transport_common import FULL, QUICK
from transport_hop import measure_hop, report_hop


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and inputs")
    parser.add_argument("--stage-ms", type=float, nargs="+", default=[1.0, 3.0, 10.0],
                        help="batch-1 stage times of part 3 (default 1 3 10)")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 8], help="max_batch values of parts 3-4")
    parser.add_argument("--skip-hop", action="store_true", help="only parts 3 and 4")
    parser.add_argument("--skip-chain", action="store_true", help="only parts 1 and 2")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--processes", dest="mode", action="store_const", const="processes",
                      help="parts 3-4 with cloud1 and cloud2 as node processes (the default)")
    mode.add_argument("--in-process", dest="mode", action="store_const", const="in-process",
                      help="parts 3-4 with all nodes in this process")
    mode.add_argument("--both", dest="mode", action="store_const", const="both", help="parts 3-4 in both modes")
    parser.set_defaults(mode="processes")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# bench/transport.py, {time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.node()}: {platform.platform()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
          + (f", load average {load[0]:.2f}" if load else ""))
    print(f"# python {platform.python_version()}, torch {torch.__version__} (1 thread), grpcio {grpc.__version__}, "
          f"{'--quick' if args.quick else 'full'}: {settings}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="splitexit-bench-") as tmp:
        if not args.skip_hop:
            rows, pipes = asyncio.run(measure_hop(settings, Path(tmp)))
            report_hop(settings, rows, pipes)
            print(f"  (parts 1-2: {time.perf_counter() - started:.0f} s)")
        if not args.skip_chain:
            package = Path(tmp) / "digits_pkg"
            net = digits_package(package)
            for mode_name in ("processes", "in-process") if args.mode == "both" else (args.mode,):
                results, ceilings = measure_chains(settings, args.stage_ms, args.max_batch, mode_name, net, package,
                                                   Path(tmp))
                report_chains(settings, mode_name, results, ceilings)
    if STARTS:
        print(f"process mode: {len(STARTS)} cluster starts, {sum(STARTS) - len(STARTS)} retried "
              f"(a node died before it was ready; its log went to stderr)")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"total {time.perf_counter() - started:.0f} s" + (f", load average {load[0]:.2f}" if load else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

