"""Repeated timings: their median and spread, and when two of them differ.

A figure is timed in `n` windows (each a run of steps, or one call), and
reported as the median of the windows with two spreads: the interquartile
range (q1-q3, which one disturbed window does not move) and the min-max range
(every window). Summaries keep their samples, so a figure derived from one
(images/s from step times, say) is summarised from the derived samples.

The noise floor. Two figures differ beyond noise only when their min-max
ranges do not overlap: a difference smaller than the spread is "within
noise". A ratio or a percentage change of two figures carries the interval
that the ranges allow (lowest over highest to highest over lowest). With
fewer than MIN_WINDOWS windows the range is no measure of the spread (two
windows can agree by chance), and the verdict is None ("not known"), never
a guess.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

#: the fewest windows whose min-max range is taken as the spread
MIN_WINDOWS = 3


def summary(samples: Sequence[float]) -> dict:
    """Median, q1, q3, min, max, n and the samples themselves."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        raise ValueError("a summary needs at least one sample")
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "min": xs[0], "max": xs[-1], "n": len(xs),
            "samples": [float(x) for x in samples]}


def of(value: float | dict) -> dict:
    """A summary as it is, or a bare number as a one-sample summary (an older record)."""
    return value if isinstance(value, dict) else summary([value])


def mapped(s: dict, fn: Callable[[float], float]) -> dict:
    """The summary of `fn` of each sample (images/s = batch / step seconds, say)."""
    return summary([fn(x) for x in s["samples"]])


def ratio(a: dict, b: dict) -> dict:
    """a / b: the medians' ratio, and the interval the two min-max ranges allow."""
    return {"value": a["median"] / b["median"], "low": a["min"] / b["max"], "high": a["max"] / b["min"],
            "n": min(a["n"], b["n"])}


def change_percent(base: dict, new: dict) -> dict:
    """(new - base) / base in percent, with its interval (as `ratio`)."""
    r = ratio(new, base)
    return {"value": 100 * (r["value"] - 1), "low": 100 * (r["low"] - 1), "high": 100 * (r["high"] - 1), "n": r["n"]}


def beyond(interval: dict, null: float) -> bool | None:
    """Whether the interval lies wholly on one side of `null` (1 for a ratio, 0
    for a change): True beyond noise, False within it, None with too few windows."""
    if interval["n"] < MIN_WINDOWS:
        return None
    return interval["low"] > null or interval["high"] < null


def within_noise(a: dict, b: dict) -> bool | None:
    """Whether two figures' min-max ranges overlap (None: too few windows to say)."""
    if min(a["n"], b["n"]) < MIN_WINDOWS:
        return None
    return a["min"] <= b["max"] and b["min"] <= a["max"]


def mean_interval(intervals: Sequence[dict]) -> dict:
    """The mean of several intervals' values, between the means of their ends."""
    return {"value": statistics.fmean(i["value"] for i in intervals),
            "low": statistics.fmean(i["low"] for i in intervals),
            "high": statistics.fmean(i["high"] for i in intervals),
            "n": min(i["n"] for i in intervals)}


# ------------------------------------------------------------- text


def fmt(s: dict, digits: int = 1) -> str:
    """'12.3 (IQR 12.1-12.6, range 11.9-13.0, n=5)'; one window: '12.3 (n=1)'."""
    if s["n"] < 2:
        return f"{s['median']:.{digits}f} (n=1)"
    return (f"{s['median']:.{digits}f} (IQR {s['q1']:.{digits}f}-{s['q3']:.{digits}f}, "
            f"range {s['min']:.{digits}f}-{s['max']:.{digits}f}, n={s['n']})")


def fmt_short(s: dict, digits: int = 1, thousands: bool = False) -> str:
    """'12.3 (11.9-13.0)', the median and min-max, for a table cell."""
    f = f"{',' if thousands else ''}.{digits}f"
    if s["n"] < 2:
        return f"{s['median']:{f}}"
    return f"{s['median']:{f}} ({s['min']:{f}}-{s['max']:{f}})"


def fmt_change(c: dict, digits: int = 1) -> str:
    """'+3.2% (-1.0 to +7.5%, within noise)'."""
    if c["n"] < MIN_WINDOWS:
        return f"{c['value']:+.{digits}f}% ({_too_few(c['n'])})"
    verdict = "beyond noise" if beyond(c, 0.0) else "within noise"
    return f"{c['value']:+.{digits}f}% ({c['low']:+.{digits}f} to {c['high']:+.{digits}f}%, {verdict})"


def fmt_ratio_percent(r: dict, digits: int = 0) -> str:
    """A ratio as a percentage with its interval: '98% (91-104%, within noise of 100%)'."""
    value = f"{100 * r['value']:.{digits}f}%"
    if r["n"] < MIN_WINDOWS:
        return f"{value} ({_too_few(r['n'])})"
    verdict = "beyond noise" if beyond(r, 1.0) else "within noise of 100%"
    return f"{value} ({100 * r['low']:.{digits}f}-{100 * r['high']:.{digits}f}%, {verdict})"


def fmt_times(r: dict) -> str:
    """A ratio as a factor with its interval: '1.26x (1.21-1.59x)' ('1.26x' from one window)."""
    if r["n"] < 2:
        return f"{r['value']:.2f}x"
    return f"{r['value']:.2f}x ({r['low']:.2f}-{r['high']:.2f}x)"


def fmt_verdict(beyond_noise: bool | None) -> str:
    """`beyond`'s answer in words."""
    return {True: "beyond noise", False: "within noise"}.get(
        beyond_noise, f"noise not known: fewer than {MIN_WINDOWS} windows")


def _too_few(n: int) -> str:
    return f"{n} window{'s' if n != 1 else ''}: noise not known, {MIN_WINDOWS} or more judge it"


def error_bar(s: dict) -> tuple[float, float]:
    """(below, above) the median to the min and max: a chart's asymmetric error bar."""
    return s["median"] - s["min"], s["max"] - s["median"]
