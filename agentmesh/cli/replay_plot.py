"""The replay plot: an agent's score over time, drawn with matplotlib.

No files and no display here: ``draw`` fills an Axes, ``render`` returns the
image's bytes on matplotlib's Agg canvas (no pyplot state); the command writes
them (``agentmesh.cli.replay``). Importing this module loads matplotlib and
numpy (~400 ms), so the CLI imports it only for ``replay agent --plot``.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import matplotlib
import numpy
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, DateFormatter
from matplotlib.figure import Figure

from projections.replay import Timeline, tier_bands

# One colour and marker per event type, the same in every plot: harm in red and
# orange, good news in greens, status changes in black, the rest in blues.
EVENT_STYLES: dict[str, tuple[str, str]] = {
    "policy.violation": ("#d62728", "v"),
    "handshake.failed": ("#ff7f0e", "X"),
    "agent.suspended": ("#000000", "s"),
    "agent.reinstated": ("#2ca02c", "P"),
    "trust.signal": ("#1a9850", "^"),
    "handshake.completed": ("#66bd63", "o"),
    "agent.registered": ("#1f77b4", "D"),
    "agent.key_rotated": ("#17becf", "d"),
    "delegation.granted": ("#6a3d9a", ">"),
    "delegation.revoked": ("#cab2d6", "<"),
    "ledger.retention_applied": ("#7f7f7f", "|"),
}
OTHER_STYLE = ("#8c564b", "h")
TIER_COLORS = {
    "verified_partner": "#2e7d32",
    "trusted": "#7cb342",
    "standard": "#fdd835",
    "probationary": "#fb8c00",
    "untrusted": "#e53935",
}


def render(timeline: Timeline, image_format: str) -> bytes:
    """The score over time with decay, tier bands shaded, events marked, as a
    ``png`` or ``svg`` image; times in UTC."""
    figure = Figure(figsize=(12, 5.5))
    FigureCanvasAgg(figure)
    image = io.BytesIO()
    # The date converter is chosen when dates first reach the axes.
    with matplotlib.rc_context({"date.converter": "concise"}):
        draw(figure.add_subplot(), timeline)
        figure.savefig(image, format=image_format, bbox_inches="tight")
    return image.getvalue()


def _times(moments: Sequence[datetime]) -> Any:
    # Naive UTC datetime64: numpy warns about (and drops) time zones.
    return numpy.array([m.replace(tzinfo=None) for m in moments], dtype="datetime64[us]")


def draw(axes: Axes, timeline: Timeline) -> None:
    """Draw ``timeline`` on ``axes``: tier bands, the score, suspensions shaded,
    events as hollow markers, decay tier changes, ticks and a title."""
    for low, high, tier in tier_bands(timeline.config):
        axes.axhspan(low, high, color=TIER_COLORS[tier], alpha=0.16, linewidth=0)
        label_y = (low + high) / 2
        axes.text(1.005, label_y, tier, transform=axes.get_yaxis_transform(), va="center")
    series = timeline.series()
    axes.plot(
        _times([t for t, _ in series]), [s for _, s in series], color="black", lw=1.2, label="score"
    )
    rows = timeline.rows
    suspended = False
    for row, following in itertools.pairwise(rows):
        if row.suspended:
            span = _times([row.time, following.time])
            axes.fill_between(
                span, 0, 1000, color="grey", alpha=0.25, linewidth=0,
                label=None if suspended else "suspended",
            )  # fmt: skip
            suspended = True
    events = [row for row in rows if row.kind == "event"]
    axes.vlines(_times([r.time for r in events]), 0, 1000, colors="grey", alpha=0.3, lw=0.5)
    # Hollow markers of distinct shapes, several events at one point drawn side by
    # side (a few points apart), so no marker hides another.
    seen: dict[tuple[datetime, int], int] = {}
    for kind in sorted({row.event or "" for row in events}, key=_event_order):
        color, marker = EVENT_STYLES.get(kind, OTHER_STYLE)
        marked = [row for row in events if row.event == kind]
        offsets = []
        for row in marked:
            spot = (row.time, row.score_after)
            offsets.append(seen.get(spot, 0))
            seen[spot] = offsets[-1] + 1
        axes.scatter(
            _times([r.time for r in marked]),
            [r.score_after + 14 * k for r, k in zip(marked, offsets, strict=True)],
            s=46, zorder=3, marker=marker, facecolors="none", edgecolors=color,
            linewidths=1.6, label=f"{kind} ({len(marked)})",
        )  # fmt: skip
    crossings = [row for row in rows if row.kind == "decay"]
    if crossings:
        x, y = _times([r.time for r in crossings]), [r.score_after for r in crossings]
        axes.scatter(x, y, s=30, zorder=3, marker="_", color="black", label="tier change (decay)")
    axes.set_ylim(0, 1000)
    axes.set_ylabel("trust score (points, 0 to 1000)")
    axes.set_xlabel("time (UTC)")
    span = (timeline.end - rows[0].time) if rows else None
    locator = AutoDateLocator(minticks=3, maxticks=8)  # type: ignore[no-untyped-call]
    axes.xaxis.set_major_locator(locator)
    formatter = DateFormatter(_time_format(span))  # type: ignore[no-untyped-call]
    axes.xaxis.set_major_formatter(formatter)
    where = ", suspended periods shaded" if suspended else ""
    axes.set_title(f"trust score of {timeline.did} over time{where}")
    axes.legend(loc="upper left", bbox_to_anchor=(1.15, 1.0), fontsize="small")


def _event_order(kind: str) -> tuple[int, str]:
    order = list(EVENT_STYLES)
    return (order.index(kind) if kind in order else len(order), kind)


def _time_format(span: timedelta | None) -> str:
    """Tick labels that say what they are: seconds on short spans, dates on long."""
    if span is None or span <= timedelta(minutes=10):
        return "%H:%M:%S"
    if span <= timedelta(days=2):
        return "%m-%d %H:%M"
    return "%Y-%m-%d"
