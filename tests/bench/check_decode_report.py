#!/usr/bin/env python3
"""Checks an `icecache-bench decode --json` report: valid JSON, every policy
of the configuration in every context with its figures in range, and the
batch sweep when one was asked for. Exit 1 naming what is wrong."""
import json
import math
import os
import sys


def fail(msg):
    print(f"check_decode_report: {msg}", file=sys.stderr)
    sys.exit(1)


# The fewest clock ticks a wall must span for the daemon's cores busy to be
# a measurement (process_cpu.h kMinCpuWallTicks: /proc counts whole ticks).
MIN_CPU_WALL_TICKS = 20


def cores_ok(cores, wall_s):
    """A daemon's cores busy over a wall of wall_s: within the machine's
    cores, or null because the wall spans too few clock ticks to measure."""
    if not isinstance(wall_s, (int, float)) or wall_s < 0:
        return False
    if cores is None:
        return wall_s * os.sysconf("SC_CLK_TCK") < MIN_CPU_WALL_TICKS
    return isinstance(cores, (int, float)) and 0 <= cores <= 1.5 * os.cpu_count()


def main(path):
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path}: {e}")
    cfg = report.get("config", {})
    wanted = cfg.get("policies") or fail("config.policies missing")
    contexts = report.get("contexts") or fail("no contexts")
    spawned = "spawned" in cfg.get("where", "")
    for c in contexts:
        got = [p["policy"] for p in c["policies"]]
        if got != wanted:
            fail(f"context {c['tokens']}: policies {got}, expected {wanted}")
        for p in c["policies"]:
            name = p["policy"]
            tpot = p["per_token_ms"]["tpot"]
            if not (isinstance(tpot, (int, float)) and tpot > 0 and math.isfinite(tpot)):
                fail(f"{name}: tpot {tpot}")
            mean_tpot = p["per_token_ms_mean"]["tpot"]
            if not (isinstance(mean_tpot, (int, float)) and mean_tpot > 0
                    and math.isfinite(mean_tpot)):
                fail(f"{name}: per_token_ms_mean.tpot {mean_tpot}")
            if not 0.0 <= p["mass_recall"] <= 1.0 + 1e-6:
                fail(f"{name}: mass_recall {p['mass_recall']}")
            quality = c["quality_layers"]
            if not quality or any(not 0 <= l < c["layers_run"] for l in quality):
                fail(f"{name}: quality layers {quality} outside the {c['layers_run']} layers run")
            if len(p["layer_mass_recall"]) != len(quality):
                fail(f"{name}: {len(p['layer_mass_recall'])} layers of quality, "
                     f"quality_layers {quality}")
            if p.get("prefetch"):
                share = p.get("later_layers_prefetched_share")
                if not (isinstance(share, (int, float)) and 0.0 <= share <= 1.0):
                    fail(f"{name}: later_layers_prefetched_share {share}")
                keys = ["later_layers_ms_prefetch_on_steps"]
                if cfg.get("prefetch_ab"):  # interleaved: steps without prefetch too
                    keys.append("later_layers_ms_prefetch_off_steps")
                elif p.get("later_layers_ms_prefetch_off_steps") is not None:
                    fail(f"{name}: steps without prefetch, but no --prefetch-ab")
                for k in keys:
                    v = p.get(k)
                    if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                        fail(f"{name}: {k} {v}")
            if name == "full" and p["mass_recall"] != 1.0:
                fail("full attention must have mass recall 1")
            if p["selector"]:  # served by the daemon: every part of a step measured
                for part in ("append", "select", "gather", "rpc", "attention"):
                    if p["per_token_ms"][part] is None:
                        fail(f"{name}: per_token_ms.{part} missing")
                if not p["tt2t_s"] > 0:
                    fail(f"{name}: tt2t_s {p['tt2t_s']}")
                # The daemon's own select and gather times (DecodeStepResponse
                # select_ns, gather_ns) make the split: both are reported.
                for part in ("select", "gather"):
                    if not p["per_token_ms"][part] > 0:
                        fail(f"{name}: per_token_ms.{part} {p['per_token_ms'][part]}: "
                             "the daemon reported no time of its own")
                # A spawned daemon's CPU time: where the prefill's and the
                # steps' wall time went.
                if spawned:
                    for key in ("prefill_daemon_cpu_s", "prefill_daemon_system_s",
                                "prefill_client_cpu_s",
                                "decode_daemon_cpu_ms_per_token"):
                        v = p.get(key)
                        if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                            fail(f"{name}: {key} {v}")
                    cores = p.get("decode_daemon_cores")
                    if not cores_ok(cores, p.get("decode_wall_s")):
                        fail(f"{name}: decode_daemon_cores {cores} over "
                             f"{p.get('decode_wall_s')} s ({os.cpu_count()} cores)")
                monitor = p.get("quality_monitor")
                if monitor is None or (p["selector"] == "mdci" and not monitor["monitored"]):
                    fail(f"{name}: quality_monitor {monitor} (icecached monitors mdci)")
                if p["selector"] == "mdci":
                    # The carry-over's state moves the select time by a third
                    # between runs: every report says what it was.
                    heads = len(monitor["widths"])
                    for key in ("carrying_heads", "carry_stopped_heads", "carried_selections"):
                        v = monitor.get(key)
                        if not isinstance(v, int) or v < 0 or (key != "carried_selections" and v > heads):
                            fail(f"{name}: quality_monitor.{key} {v} ({heads} heads)")
                    if not isinstance(monitor.get("carry_stopped"), bool):
                        fail(f"{name}: quality_monitor.carry_stopped {monitor.get('carry_stopped')}")
        for b in c["batches"]:
            cores = b.get("daemon_cores")
            wall_ms = b.get("wall_ms")
            if spawned and not cores_ok(cores, wall_ms / 1000 if isinstance(wall_ms, (int, float)) else None):
                fail(f"batch {b['batch']}: daemon_cores {cores} over {wall_ms} ms "
                     f"({os.cpu_count()} cores)")
        batches = [b["batch"] for b in c["batches"]]
        if max(cfg["batch"]) > 1 and batches != cfg["batch"]:
            fail(f"context {c['tokens']}: batches {batches}, expected {cfg['batch']}")
    print(f"check_decode_report: {path}: {len(contexts)} context(s), policies {wanted}: ok")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        fail("usage: check_decode_report.py REPORT.json")
    main(sys.argv[1])
