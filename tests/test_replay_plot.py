"""The replay plot reads at a glance (issue 14, item 11): fixed colours per event
type, a legend, no marker hidden by another, ticks with units, a truthful title."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from agentmesh.cli import replay_plot
from agentmesh.cli.replay_plot import EVENT_STYLES
from projections.config import TrustConfig
from projections.replay import Timeline, TimelineRow
from projections.trust import new_trust, to_micros

DID = "did:mesh:" + "cd" * 16
CONFIG = TrustConfig()
T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def row(seconds: float, event: str | None, score: int, *, suspended: bool = False) -> TimelineRow:
    moment = T0 + timedelta(seconds=seconds)
    return TimelineRow(
        kind="event" if event else "end",
        time=moment,
        position=None,
        event=event,
        actor=None,
        score_before=score,
        score_after=score,
        tier_before="trusted",
        tier_after="suspended" if suspended else "trusted",
        decay=0,
        trust=new_trust(DID, CONFIG, to_micros(moment)),
        suspended=suspended,
    )


def draw(rows: list[TimelineRow]) -> Figure:
    figure = Figure()
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    timeline = Timeline(DID, None, rows[-1].time, tuple(rows), CONFIG)
    replay_plot.draw(axes, timeline)
    figure.canvas.draw()
    return figure


def markers(figure: Figure) -> dict[str, tuple[str, list[tuple[float, float]]]]:
    axes = figure.axes[0]
    found = {}
    for collection in axes.collections:
        label = str(collection.get_label())
        kind = label.rsplit(" (", 1)[0]
        if kind in EVENT_STYLES:
            edge: Any = collection.get_edgecolor()
            offsets = numpy.asarray(collection.get_offsets()).tolist()
            found[kind] = (to_hex(edge[0]), [(float(x), float(y)) for x, y in offsets])
    return found


def test_each_event_type_has_its_fixed_colour_and_a_legend_entry() -> None:
    one = draw(
        [row(0, "agent.registered", 800), row(5, "policy.violation", 500), row(9, None, 500)]
    )
    other = draw(
        [
            row(0, "agent.registered", 800),
            row(3, "delegation.granted", 800),
            row(5, "policy.violation", 500),
            row(9, None, 500),
        ]
    )
    for figure in (one, other):
        for kind, (colour, _) in markers(figure).items():
            assert colour == EVENT_STYLES[kind][0], kind
        legend_box = figure.axes[0].get_legend()
        assert legend_box is not None
        legend = [t.get_text() for t in legend_box.get_texts()]
        assert any(text.startswith("policy.violation") for text in legend)
    assert EVENT_STYLES["policy.violation"][0] != "#7f7f7f"  # harm is not grey
    assert EVENT_STYLES["agent.suspended"][0] != EVENT_STYLES["trust.signal"][0]


def test_events_at_one_point_do_not_hide_each_other() -> None:
    figure = draw(
        [
            row(0, "agent.registered", 800),
            row(5, "policy.violation", 700),
            row(5, "trust.signal", 700),
            row(5, "policy.violation", 700),
            row(9, None, 700),
        ]
    )
    points = [p for _, offsets in markers(figure).values() for p in offsets]
    assert len(points) == len(set(points)) == 4


def test_ticks_have_units_and_the_title_tells_the_truth() -> None:
    short = draw([row(0, "agent.registered", 800), row(20, None, 800)])
    axes = short.axes[0]
    assert "UTC" in axes.get_xlabel()
    assert "points" in axes.get_ylabel()
    labels = [t.get_text() for t in axes.get_xticklabels() if t.get_text()]
    assert labels
    assert all(text.count(":") == 2 for text in labels), labels  # HH:MM:SS
    assert "suspend" not in axes.get_title()
    suspended = draw(
        [
            row(0, "agent.registered", 800),
            row(5, "agent.suspended", 800, suspended=True),
            row(9, "agent.reinstated", 800),
            row(12, None, 800),
        ]
    )
    assert "suspended" in suspended.axes[0].get_title()
