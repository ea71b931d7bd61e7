"""Print a checkpoint's meta-training learning curve: validation accuracy at each validation and
the mean query loss / accuracy of the meta-training episodes over windows of outer steps.

    python -m bench.curve runs/arsc/last [--window 20]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from metasent.meta.checkpoint import CONFIG_FILE
from metasent.meta.config import CheckpointConfig


def curve_table(config: CheckpointConfig, window: int) -> str:
    curve = config.metrics.get("curve", [])
    validation = {row["step"]: row["accuracy"] for row in config.metrics.get("validation", [])}
    lines = [f"{'steps':>11s} {'query loss':>10s} {'query acc %':>11s} {'val acc % (at step)':>20s}"]
    if 0 in validation:
        lines.append(f"{'0':>11s} {'':>10s} {'':>11s} {validation[0]:>12.2f} (0)")
    for start in range(0, len(curve), window):
        rows = curve[start : start + window]
        last = rows[-1]["step"]
        in_window = [s for s in validation if rows[0]["step"] <= s <= last]
        val = f"{validation[max(in_window)]:>12.2f} ({max(in_window)})" if in_window else ""
        loss = statistics.fmean(r["query_loss"] for r in rows)
        acc = 100 * statistics.fmean(r["query_accuracy"] for r in rows)
        lines.append(f"{rows[0]['step']:>5d}-{last:<5d} {loss:>10.3f} {acc:>11.1f} {val:>20s}")
    lines.append(
        f"best validation {config.metrics.get('best_val_accuracy')} at step {config.metrics.get('best_step')}; "
        f"{config.step} outer steps in {config.metrics.get('train_seconds')} s"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--window", type=int, default=20)
    args = parser.parse_args()
    config = CheckpointConfig.model_validate_json((args.checkpoint / CONFIG_FILE).read_text())
    print(curve_table(config, args.window))


if __name__ == "__main__":
    main()
