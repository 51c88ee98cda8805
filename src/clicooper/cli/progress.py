"""Rich progress bars for epochs and batches, and the end-of-run summary table."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

console = Console(stderr=True)


class _Bars:
    """``(epoch, batch, n_batches, loss)`` moves the bars; ``epoch_done`` shows the last
    finished epoch's accuracy beside them."""

    def __init__(self, bars: Progress, epoch_bar: TaskID, batch_bar: TaskID) -> None:
        self.bars, self.epoch_bar, self.batch_bar = bars, epoch_bar, batch_bar
        self.last = ""

    def __call__(self, epoch: int, batch: int, n_batches: int, loss: float) -> None:
        self.bars.update(self.batch_bar, total=n_batches, completed=batch, info=f"loss {loss:.4f}")
        info = f"epoch {epoch}{self.last}"
        self.bars.update(self.epoch_bar, completed=epoch - 1 + batch / n_batches, info=info)

    def epoch_done(self, entry: dict[str, Any]) -> None:
        self.last = (
            f" (epoch {entry['epoch']}: train {entry['train_accuracy']:.3f}, "
            f"test {entry['test_accuracy']:.3f})"
        )
        self.bars.update(self.epoch_bar, completed=entry["epoch"], info=self.last.strip(" ()"))


@contextmanager
def training_progress(epochs: int, label: str = "training") -> Iterator[Any]:
    """A callback ``(epoch, batch, n_batches, loss)`` driving two bars (see :class:`_Bars`)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bars:
        epoch_bar = bars.add_task(f"{label}: epochs", total=epochs, info="")
        batch_bar = bars.add_task("  batches", total=1, info="")
        yield _Bars(bars, epoch_bar, batch_bar)


def summary_table(results: dict[str, Any]) -> Table:
    """The headline numbers of a run."""
    table = Table(title=f"CliCooper run: {results['mode']} on {results['dataset']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    privacy = results.get("privacy") or {}
    eps = privacy.get("epsilon")
    rows = [
        ("test accuracy", f"{results['accuracy']['test']:.4f}"),
        ("train accuracy", f"{results['accuracy']['train']:.4f}"),
        ("noise multiplier", f"{privacy.get('noise_multiplier', 0):g}"),
        ("epsilon (delta)", "none" if eps is None else f"{eps:.2f} ({privacy['delta']:g})"),
        ("pseudo-classes", str(results["labels"]["pseudo_classes"])),
    ]
    if privacy.get("baseline"):  # vanilla on release once's frozen head
        rows.append(("protection", "none: vanilla baseline on the frozen head"))
    readouts = results.get("readouts") or {}
    for name, label in (
        ("ncm", "readout of the releases: nearest class mean"),
        ("logistic", "readout of the releases: logistic"),
        ("public_only", "chain after its public warm start"),
    ):
        if name in readouts:
            rows.append((label, f"{readouts[name]['test']:.4f}"))
    grad = privacy.get("gradient") or {}
    if grad.get("epsilon") is not None:
        rows.append(
            (
                "gradient noise, epsilon",
                f"{grad['noise_multiplier']:g} (clip {grad['clip_norm']:g}), {grad['epsilon']:.2f}",
            )
        )
    rows += [
        ("train seconds", f"{results['timing']['train_seconds']:.1f}"),
        *compute_rows(results.get("compute")),
    ]
    wm = results.get("watermark") or {}
    if wm.get("enabled"):
        rows.append(("watermark stages", str(wm["stages"])))
        rows.append(("ledger verifies", "yes" if wm["verified"] else f"NO: {wm['first_failure']}"))
    for row in rows:
        table.add_row(*row)
    return table


def compute_rows(compute: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Owner share and, per party, training FLOPs and CPU seconds (results' ``compute``)."""
    if not compute:
        return []
    share = compute.get("owner_share")
    rows = [("owner share of training FLOPs", "n/a" if share is None else f"{share:.1%}")]
    cpu = compute.get("cpu_seconds", {})
    for party in sorted(set(compute.get("flops", {})) | set(cpu), key=_party_order):
        flops = compute.get("flops", {}).get(party)
        seconds = cpu.get(party)
        rows.append(
            (
                f"{party}: FLOPs, CPU s",
                f"{'-' if flops is None else format_flops(flops)}, "
                f"{'-' if seconds is None else f'{seconds:.1f}'}",
            )
        )
    return rows


def format_flops(flops: float) -> str:
    """``1.23e9`` as ``1.23 G``: SI prefixes up to peta."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {prefix}"
    return f"{flops:.0f}"


def _party_order(name: str) -> tuple[int, int, str]:
    """do first, then t1, t2, ... in number order, then the rest (the verifier)."""
    if name == "do":
        return (0, 0, name)
    if name[:1] == "t" and name[1:].isdigit():
        return (1, int(name[1:]), name)
    return (2, 0, name)
