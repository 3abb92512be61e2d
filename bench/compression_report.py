"""``compression.py``'s outputs: the CSVs (merged with earlier ones by key), the tables on stdout
and the two PNGs. Everything here reads rows (dicts), so ``--plot-only`` can rebuild the tables
and figures from the CSVs alone."""

from __future__ import annotations

import csv
from pathlib import Path

SUMMARY_CSV = "compression.csv"
CURVES_CSV = "compression_curves.csv"
DOWNLINK_CSV = "compression_downlink.csv"
COST_CSV = "compression_cost.csv"
KEYS = {
    SUMMARY_CSV: ("task", "arm"),
    CURVES_CSV: ("task", "arm"),
    DOWNLINK_CSV: ("task", "arm", "behind"),
    COST_CSV: ("model", "what", "method"),
}
TASK_ORDER = ("digits", "synthetic", "1m")
CURVE_ARMS = ("none", "int8-ef", "int8-noef", "topk1-ef", "topk1-noef", "topk10-ef", "prune10-ef")
COLOURS = {
    "none": "black",
    "fp16": "tab:gray",
    "bf16": "tab:brown",
    "int8": "tab:blue",
    "topk1": "tab:red",
    "topk10": "tab:orange",
    "prune10": "tab:green",
}
DP_COLOURS = {
    "dp-baseline": "black",
    "dp-central": "tab:red",
    "dp-local": "tab:purple",
    "dp20-baseline": "tab:gray",
    "dp20-central": "tab:orange",
    "dp20-central-long": "tab:orange",
}


def num(value) -> float | None:
    if value is None or value == "":
        return None
    return float(value)


def _key(row: dict, fields: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(str(row[name]) for name in fields)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_merged(out_dir: Path, name: str, rows: list[dict]) -> list[dict]:
    """Write ``rows`` to ``out_dir/name``, keeping earlier rows whose key was not re-measured;
    return all of them. (Curves: the key is the run's, so a re-run replaces its whole curve.)"""
    path = out_dir / name
    fields = KEYS[name]
    fresh = {_key(row, fields) for row in rows}
    kept = [row for row in read_rows(path) if _key(row, fields) not in fresh]
    merged = kept + rows
    if not merged:
        return []
    columns: list[str] = []
    for row in merged:
        columns += [column for column in row if column not in columns]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in merged:
            writer.writerow({column: "" if row.get(column) is None else row.get(column) for column in columns})
    return read_rows(path)


def _ordered(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda row: _sort_key((row["task"], row["arm"])))


def _f(value, spec: str, missing: str = "-") -> str:
    value = num(value)
    return missing if value is None else format(value, spec)


def _bytes(value) -> str:
    value = num(value)
    if value is None:
        return "-"
    if value >= 2**20:
        return f"{value / 2**20:.2f} MiB"
    if value >= 10 * 1024:
        return f"{value / 1024:.1f} KiB"
    return f"{value:.0f} B"


# -- tables ------------------------------------------------------------------------


def print_arms(rows: list[dict]) -> None:
    compression = _ordered([row for row in rows if row["group"] == "compression"])
    for task in TASK_ORDER:
        task_rows = [row for row in compression if row["task"] == task]
        if not task_rows:
            continue
        none = next((row for row in task_rows if row["arm"] == "none"), None)
        first = task_rows[0]
        print(
            f"\n{task}: {first['workers']} workers, {num(first['budget_s']):.0f} s, target {first['target']}; "
            "up = median bytes a worker sent per update, down = mean bytes read per task"
        )
        print(
            f"{'arm':<12} {'up/update':>11} {'up x':>6} {'down/task':>11} {'diff reads':>10} {'t→target':>8} "
            f"{'final':>6} {'last10s':>7} {'Δ pts':>6} {'updates':>7} {'wkr ms/task':>11}  rejected"
        )
        for row in task_rows:
            up, base_up = num(row["up_bytes_median"]), num(none["up_bytes_median"]) if none else None
            ratio = f"{base_up / up:.1f}x" if up and base_up else "-"
            last, base_last = num(row["final_acc_last10s"]), num(none["final_acc_last10s"]) if none else None
            delta = f"{100 * (last - base_last):+.1f}" if last is not None and base_last is not None else "-"
            reads = sum(int(row[f"reads_{kind}"] or 0) for kind in ("full", "diffs", "cache", "held"))
            diff_share = f"{int(row['reads_diffs'] or 0) / reads:.0%}" if reads else "-"
            updates = num(row["updates_in_budget"]) or 0
            cpu = num(row["workers_cpu_s"])
            per_update = f"{1000 * cpu / num(row['tasks_done']):.0f}" if cpu and num(row["tasks_done"]) else "-"
            print(
                f"{row['arm']:<12} {_bytes(up):>11} {ratio:>6} {_bytes(row['down_bytes_mean']):>11} "
                f"{diff_share:>10} {_f(row['t_target_s'], '.1f', 'never'):>8} {_f(row['final_acc'], '.3f'):>6} "
                f"{_f(row['final_acc_last10s'], '.3f'):>7} {delta:>6} {updates:>7.0f} {per_update:>11}  "
                f"{row['rejected'] or '-'}"
            )


def print_downlink(rows: list[dict]) -> None:
    if not rows:
        return
    print("\ndownlink: bytes a worker N versions behind reads through the chain of consecutive diffs, share of the")
    print("full weights (median over the ~20 windows of the run's last versions, diffs made with make_diff)")
    print(f"{'task':<10} {'arm':<12} {'full':>10} " + " ".join(f"{f'{b} behind':>10}" for b in (1, 3, 10)))
    by_arm: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        by_arm.setdefault((row["task"], row["arm"]), {})[row["behind"]] = row
    for (task, arm), cells in sorted(by_arm.items(), key=lambda item: _sort_key(item[0])):
        full = next(iter(cells.values()))["full_bytes"]
        shares = [_f(cells.get(str(b), {}).get("chain_to_full"), ".1%") for b in (1, 3, 10)]
        print(f"{task:<10} {arm:<12} {_bytes(full):>10} " + " ".join(f"{share:>10}" for share in shares))


def _sort_key(key: tuple[str, str]) -> tuple[int, int]:
    from bench.compression_config import ARMS

    task, arm = key
    arms = list(ARMS)
    return (
        TASK_ORDER.index(task) if task in TASK_ORDER else 99,
        arms.index(arm) if arm in arms else 99,
    )


def print_dp(rows: list[dict]) -> None:
    dp = [row for row in rows if row["group"] == "dp"]
    if not dp:
        return
    print("\ndifferential privacy on digits (FedBuff K=3, fixed cut), delta 1e-5, budget epsilon 8")
    print(
        f"{'run':<18} {'workers':>7} {'clip':>7} {'noise':>6} {'q':>5} {'planned':>7} {'steps':>5} {'epsilon':>7} "
        f"{'t→0.90':>7} {'final':>6} {'last10s':>7} {'best':>6}  stopped by"
    )
    for row in dp:
        print(
            f"{row['arm']:<18} {row['workers']:>7} {_f(row.get('dp_clip'), '.3g'):>7} "
            f"{_f(row.get('dp_noise'), '.2f'):>6} {_f(row.get('dp_sample_rate'), '.2f'):>5} "
            f"{_f(row.get('dp_planned_steps'), '.0f'):>7} {_f(row['dp_steps'], '.0f'):>5} "
            f"{_f(row['epsilon'], '.2f'):>7} {_f(row['t_target_s'], '.1f', 'never'):>7} "
            f"{_f(row['final_acc'], '.3f'):>6} "
            f"{_f(row['final_acc_last10s'], '.3f'):>7} {_f(row['best_acc'], '.3f'):>6}  {row['reason'] or '-'}"
        )


def print_cost(rows: list[dict]) -> None:
    if not rows:
        return
    print("\nCPU cost (one thread, medians) against one local training step (batch 16, forward + backward + SGD step)")
    print(
        f"{'model':<10} {'step ms':>8} {'uplink':<20} {'payload':>10} {'x smaller':>9} {'encode':>8} {'decode':>8} "
        f"{'roundtrip':>9} {'rt/step':>8} {'rel err':>8}"
    )
    for row in [row for row in rows if row["what"] == "uplink"]:
        ratio = num(row["reference_bytes"]) / num(row["bytes"])
        rt = num(row["roundtrip_ms"]) / num(row["step_ms"])
        print(
            f"{row['model']:<10} {num(row['step_ms']):>8.3f} {row['method']:<20} {_bytes(row['bytes']):>10} "
            f"{ratio:>8.1f}x {_f(row['encode_ms'], '.3f'):>8} {_f(row['decode_ms'], '.3f'):>8} "
            f"{_f(row['roundtrip_ms'], '.3f'):>9} {rt:>7.2f}x {_f(row['rel_error'], '.2g'):>8}"
        )
    print(
        f"\n{'model':<10} {'step ms':>8} {'K=3 step of':<20} {'changed':>8} {'diff':>10} {'of full':>8} "
        f"{'make':>8} {'apply':>8} {'make/step':>9} {'apply/step':>10}"
    )
    for row in [row for row in rows if row["what"] == "downlink"]:
        step = num(row["step_ms"])
        print(
            f"{row['model']:<10} {step:>8.3f} {row['method']:<20} {_f(row['changed'], '.1%'):>8} "
            f"{_bytes(row['bytes']):>10} {num(row['bytes']) / num(row['reference_bytes']):>8.1%} "
            f"{num(row['make_diff_ms']):>8.3f} {num(row['apply_diff_ms']):>8.3f} "
            f"{num(row['make_diff_ms']) / step:>8.2f}x {num(row['apply_diff_ms']) / step:>9.2f}x"
        )


# -- figures -----------------------------------------------------------------------


def _method(arm: str) -> str:
    return arm.rsplit("-", 1)[0] if arm.endswith(("-ef", "-noef")) else arm


def plot_uplink(rows: list[dict], out_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    compression = [
        row
        for row in rows
        if row["group"] == "compression" and num(row["up_bytes_median"]) and not row["arm"].endswith("-diffs")
    ]
    tasks = [task for task in TASK_ORDER if any(row["task"] == task for row in compression)]
    if not tasks:
        return None
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        task_rows = [row for row in compression if row["task"] == task]
        for row in task_rows:
            colour = COLOURS.get(_method(row["arm"]), "tab:purple")
            hollow = row["arm"].endswith("-noef")
            x, y = num(row["up_bytes_median"]), num(row["final_acc_last10s"])
            if y is None:
                continue
            axis.scatter(
                [x], [y], s=55, marker="o", facecolors="none" if hollow else colour, edgecolors=colour, linewidths=1.5
            )
            axis.annotate(row["arm"], (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
        none = next((row for row in task_rows if row["arm"] == "none"), None)
        if none and num(none["final_acc_last10s"]) is not None:
            axis.axhline(num(none["final_acc_last10s"]) - 0.01, color="grey", linestyle=":", linewidth=1)
            axis.axvline(num(none["up_bytes_median"]) / 4, color="grey", linestyle=":", linewidth=1)
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set(
            xlabel="uplink bytes per update (median, as sent)",
            ylabel="test accuracy, mean of the last 10 s",
            title=f"{task} ({none['budget_s'] if none else '?'} s a run)",
        )
    figure.suptitle(
        "filled: error feedback on (or lossless); hollow: off; dotted: 4x fewer bytes than none, 1 point below none",
        fontsize=9,
    )
    figure.tight_layout()
    path = out_dir / "compression_uplink.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_curves(rows: list[dict], curves: list[dict], out_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {(row["task"], row["arm"]): row for row in rows}
    panels = [task for task in TASK_ORDER if any(row["task"] == task and row["group"] != "dp" for row in rows)]
    if any(row["group"] == "dp" for row in rows):
        panels.append("dp")
    if any(row["arm"].endswith("-long") for row in rows):
        panels.append("dp-long")
    if not panels:
        return None
    columns = min(3, len(panels))
    rows_of_panels = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows_of_panels, columns, figsize=(5.4 * columns, 4.2 * rows_of_panels), squeeze=False)
    for axis in axes.ravel()[len(panels) :]:
        axis.set_visible(False)
    for axis, panel in zip(axes.ravel(), panels):
        if panel == "dp":
            chosen = [key for key, row in groups.items() if row["group"] == "dp" and not key[1].endswith("-long")]
        elif panel == "dp-long":
            chosen = [key for key in groups if key[1] in ("dp20-baseline", "dp20-central-long")]
        else:
            chosen = [(panel, arm) for arm in CURVE_ARMS if (panel, arm) in groups]
        for key in chosen:
            row = groups[key]
            points = [
                c
                for c in curves
                if (c["task"], c["arm"]) == key and c["accuracy"] and num(c["t_s"]) <= num(row["budget_s"])
            ]
            if panel.startswith("dp"):
                colour, style = DP_COLOURS.get(key[1], "tab:blue"), "-"
                label = f"{key[1]} (eps {_f(row['epsilon'], '.2f')})" if num(row["epsilon"]) else key[1]
            else:
                colour = COLOURS.get(_method(key[1]), "tab:purple")
                style, label = ("--" if key[1].endswith("-noef") else "-"), key[1]
            axis.plot(
                [num(c["t_s"]) for c in points],
                [num(c["accuracy"]) for c in points],
                style,
                color=colour,
                linewidth=1,
                label=label,
            )
        target = num(groups[chosen[0]]["target"]) if chosen else None
        if target:
            axis.axhline(target, color="grey", linestyle=":", linewidth=1)
        axis.set(
            xlabel="seconds since version 0",
            ylabel="test accuracy",
            ylim=(0, 1),
            title={"dp": "digits, differential privacy", "dp-long": "digits, 20 workers, until epsilon 8"}.get(
                panel, panel
            ),
        )
        axis.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    path = out_dir / "compression_curves.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
