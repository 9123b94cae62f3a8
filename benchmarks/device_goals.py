"""The report of `benchmarks/device_check.py` and its judgement of BENCHMARKS.md's GPU goals: the rows it prints,
the vendors' dense bf16 peaks, and a PASS / FAIL / "not measured" verdict per goal from a run's figures."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Vendors' dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a part of the name torch reports; the first match
# wins, so the longer names come first ("H100 NVL" before "H100", "L40S" before "L4", "A100" before "A10").
DENSE_BF16_PEAK_TFLOPS = (
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.0),
    ("RTX A6000", 155.0),
    ("4090", 165.0),
)
# The goals of BENCHMARKS.md's GPU section, each judged from this run's figures.
GOAL_FRACTION_OF_PEAK = 0.40  # bf16 SelfPatch step, of the dense bf16 peak
GOAL_SELFPATCH_OVER_DINO = 1.2  # bf16 step-time ratio
GOAL_LOADER_CORES = 8.0  # data-loader cores per GPU for the bf16 step's images/s
GOAL_AUGMENTATION_SHARE = 0.10  # device time of the device-side augmentation, of a bf16 step


@dataclass
class Row:
    section: str
    check: str
    value: float | str | None = None
    unit: str = ""
    status: str = "info"  # ok | FAIL | skipped | info
    note: str = ""


@dataclass
class Report:
    mode: str
    device: str
    environment: dict
    rows: list[Row] = field(default_factory=list)

    def add(self, *args, **kwargs) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        value = format_value(row.value)
        print(
            f"  [{row.status:>7}] {row.section:<11} {row.check:<48} {value:>12} {row.unit:<8} {row.note}",
            flush=True,
        )
        return row

    def check(
        self, section: str, check: str, value: float, limit: float, unit: str = "", note: str = ""
    ) -> bool:
        ok = math.isfinite(value) and value <= limit
        self.add(
            section,
            check,
            value,
            unit,
            "ok" if ok else "FAIL",
            f"limit {limit:g}" + (f"; {note}" if note else ""),
        )
        return ok


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def vendor_peak_tflops(device_name: str) -> tuple[float | None, str]:
    """(dense bf16 peak in TFLOP/s, the table entry it came from) for a device name, or (None, why)."""
    for part, tflops in DENSE_BF16_PEAK_TFLOPS:
        if part.lower() in device_name.lower():
            return tflops, part
    return None, f"{device_name!r} is not in the table of known devices"


def verdicts(report: Report, results: dict, args) -> list[dict]:
    """Pass / fail / not measured for each GPU goal of BENCHMARKS.md, from this run's figures."""
    skipped = {row.section: row.note for row in report.rows if row.status == "skipped"}
    out = []

    def verdict(goal: str, value: float | None, passed: bool | None, detail: str, missing: str) -> None:
        if args.cpu_mode:
            status, value, detail = "not measured", None, "CPU mode: the goals are for a GPU"
        elif value is None:
            status, detail = "not measured", missing
        else:
            status = "PASS" if passed else "FAIL"
        # one row per goal of BENCHMARKS.md
        out.append({"goal": goal, "status": status, "value": value, "detail": detail})

    best = next((label for label in ("selfpatch bf16+compile", "selfpatch bf16") if label in results), None)
    vendor = results.get("vendor_bf16_peak_tflops")
    measured = results.get("measured_bf16_matmul_tflops")
    if best is not None and (vendor or measured):
        peak, source = (vendor, "vendor dense bf16 peak") if vendor else (measured, "measured bf16 matmul")
        fraction = results[best]["tflops"] / peak
        detail = f"{best}: {results[best]['tflops']:.0f} TFLOP/s of the {source} {peak:.0f}"
        if vendor and measured:
            detail += f" ({results[best]['tflops'] / measured:.0%} of the measured matmul {measured:.0f})"
        verdict(f"bf16 SelfPatch step >= {GOAL_FRACTION_OF_PEAK:.0%} of the dense peak", fraction,
                fraction >= GOAL_FRACTION_OF_PEAK, detail, "")  # fmt: skip
    else:
        verdict(f"bf16 SelfPatch step >= {GOAL_FRACTION_OF_PEAK:.0%} of the dense peak", None, None, "",
                "no bf16 SelfPatch step was timed" + (f" ({skipped['model']})" if "model" in skipped else ""))  # fmt: skip
    ratio_label = next((f"ratio {p}" for p in ("bf16+compile", "bf16") if f"ratio {p}" in results), None)
    ratio = results.get(ratio_label) if ratio_label else None
    verdict(f"SelfPatch / DINO step time <= {GOAL_SELFPATCH_OVER_DINO}", ratio,
            ratio is not None and ratio <= GOAL_SELFPATCH_OVER_DINO, ratio_label or "",
            "both bf16 steps are needed" + (f" ({skipped['model']})" if "model" in skipped else ""))  # fmt: skip
    loaders = {
        k: v["cores_per_device"]
        for k, v in results.items()
        if k.startswith("data ") and "cores_per_device" in v
    }
    if loaders and best is not None:
        mode, cores = min(loaders.items(), key=lambda item: item[1])
        detail = ", ".join(f"{k.removeprefix('data ')} {v:.1f}" for k, v in loaders.items())
        verdict(f"loader cores per GPU <= {GOAL_LOADER_CORES:g}", cores, cores <= GOAL_LOADER_CORES,
                f"best {mode.removeprefix('data ')}; cores per mode: {detail}", "")  # fmt: skip
    else:
        why = "needs a loader rate and a bf16 step rate"
        why += "".join(f" ({skipped[s]})" for s in ("model", "data") if s in skipped)
        verdict(f"loader cores per GPU <= {GOAL_LOADER_CORES:g}", None, None, "", why)
    share = results.get("device augmentation", {}).get("share_of_step")
    verdict(f"device augmentation < {GOAL_AUGMENTATION_SHARE:.0%} of a bf16 step", share,
            share is not None and share < GOAL_AUGMENTATION_SHARE, "device_crops, one batch",
            "needs the device augmentation and the bare bf16 step")  # fmt: skip
    return out


__all__ = [
    "DENSE_BF16_PEAK_TFLOPS",
    "GOAL_AUGMENTATION_SHARE",
    "GOAL_FRACTION_OF_PEAK",
    "GOAL_LOADER_CORES",
    "GOAL_SELFPATCH_OVER_DINO",
    "Report",
    "Row",
    "format_value",
    "vendor_peak_tflops",
    "verdicts",
]
