"""Sanity checks on measured figures: results that cannot be true are flagged,
with what they most likely mean, instead of being printed as findings.

Each check returns a flag, a dict {"check", "subject", "message"}, or None.
Flags go into the command's JSON ("flags"), its printed table and report.md.
Verdicts use the noise floor of profiling/stats.py: only what lies beyond
the spread of the windows is called impossible.
"""

from __future__ import annotations

from iecl.profiling import stats

#: a profile's in-place parts over its wall clock, per window, outside these
#: bounds (wholly, min-max) do not add up: above, the parts count time twice;
#: below, the step spends time where no mark sees it
PARTS_OVER_WALL = (0.8, 1.05)
#: in-place and isolated times of a stage this many times apart disagree
ISOLATED_DISAGREEMENT = 2.0
#: stages under this share of the step are not compared (launch latency dominates them)
ISOLATED_MIN_SHARE = 0.02

_BUSY = "the machine's load changed between the timings (other processes, clock frequency); rerun with more --repeats on a quiet machine"


def flag(check: str, subject: str, message: str) -> dict:
    return {"check": check, "subject": subject, "message": message}


def loader_faster_than_model(subject: str, model_only_ms: dict, loader_ms: dict) -> dict | None:
    """A real loader cannot make a step faster than data already on the device."""
    efficiency = stats.ratio(model_only_ms, loader_ms)
    if not (stats.beyond(efficiency, 1.0) and efficiency["value"] > 1.0):
        return None
    return flag("loader_faster_than_model", subject,
                f"the real-loader step ({stats.fmt(loader_ms)} ms) was faster than the step with the data already "
                f"on the device ({stats.fmt(model_only_ms)} ms) beyond noise: loader efficiency "
                f"{stats.fmt_ratio_percent(efficiency)} is impossible; {_BUSY}")


def negative_overhead(subject: str, without_ms: dict, with_ms: dict, what: str = "SAIB") -> dict | None:
    """Added work cannot make a step faster."""
    change = stats.change_percent(without_ms, with_ms)
    if not (stats.beyond(change, 0.0) and change["value"] < 0):
        return None
    return flag("negative_overhead", subject,
                f"the step with {what} ({stats.fmt(with_ms)} ms) was faster than without it ({stats.fmt(without_ms)} ms) "
                f"beyond noise ({stats.fmt_change(change)}): {what} adds work, so this is not its cost; {_BUSY}")


def parts_add_up(subject: str, parts_over_wall: dict) -> dict | None:
    """A profile's in-place stages per window against the same window's wall clock."""
    low, high = PARTS_OVER_WALL
    if parts_over_wall["min"] > high:
        return flag("parts_exceed_step", subject,
                    f"the stages add up to more than the step: parts / wall clock {stats.fmt(parts_over_wall, 3)} "
                    f"(above {high:g} in every window); some time is counted in two stages")
    if parts_over_wall["max"] < low:
        return flag("parts_fall_short", subject,
                    f"the stages add up to far less than the step: parts / wall clock {stats.fmt(parts_over_wall, 3)} "
                    f"(below {low:g} in every window); the step spends time no mark sees (between steps, "
                    "or a synchronisation outside the marks)")
    return None


def isolated_disagrees(subject: str, stages: dict) -> dict | None:
    """Stages whose in-place and isolated medians are ISOLATED_DISAGREEMENT or more apart.
    `stages`: profile's stage table (in_place_ms, isolated_ms, share, label)."""
    apart = []
    for s in stages.values():
        here, alone = s.get("in_place_ms"), s.get("isolated_ms")
        if not here or not alone or s.get("share", 0.0) < ISOLATED_MIN_SHARE:
            continue
        factor = max(here / alone, alone / here)
        if factor >= ISOLATED_DISAGREEMENT:
            apart.append(f"{s['label']} {here:.2f} ms in place vs {alone:.2f} ms alone ({factor:.1f}x)")
    if not apart:
        return None
    return flag("isolated_disagrees", subject,
                f"in-place and isolated times disagree by {ISOLATED_DISAGREEMENT:g}x or more: {'; '.join(apart)}. "
                "In place, a stage is charged the device's idle gap before it and overlaps its neighbours; alone, it "
                "is synchronised on both sides and pays its launches in full, so read the in-place time as the "
                "stage's cost in training and the isolated one as its own work")


def faster_than_matmul(subject: str, share_of_matmul: float, device: str) -> dict | None:
    """On a GPU, a measured TFLOP/s above the device's own GEMM rate means a wrong count or timing."""
    if device.startswith("cpu") or share_of_matmul <= 1.0:
        return None
    return flag("faster_than_matmul", subject,
                f"{100 * share_of_matmul:.0f}% of this device's measured bf16 matmul rate: more than the device "
                "does; the FLOP count or the timing is wrong")


def lines(flags: list[dict]) -> list[str]:
    """Flags as text lines, for tables and report.md."""
    return [f"- **check failed ({f['check']})**, {f['subject']}: {f['message']}" for f in flags]
