#!/usr/bin/env python3
"""Draws store-backlog series (CSV from `durable_compare --sustain-secs S --samples FILE`) as one
SVG line chart, standard library only.

    python3 docs/bench/plot_backlog.py OUT.svg "TITLE" LABEL=FILE.csv [LABEL=FILE.csv ...]

Each CSV has a header line and rows `secs,store_backlog_records`. Another name for the second
column (e.g. `secs,acknowledged gifts per second`) becomes the y axis's label: the same chart
for any one series per second.
"""
import csv
import sys
from html import escape

W, H = 760, 360
LEFT, RIGHT, TOP, BOTTOM = 80, 20, 40, 50
COLOURS = ["#c0392b", "#2471a3", "#e59866", "#5dade2"]


def nice_step(span, ticks=6):
    raw = span / ticks
    magnitude = 10 ** (len(str(int(raw))) - 1) if raw >= 1 else 1
    for m in (1, 2, 5, 10):
        if raw <= m * magnitude:
            return m * magnitude
    return 10 * magnitude


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    out, title, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]
    series = []
    y_label = "store backlog (records durable, not yet stored)"
    for pair in pairs:
        label, _, path = pair.partition("=")
        with open(path, newline="") as f:
            table = list(csv.reader(f))
            if len(table[0]) > 1 and table[0][1] != "store_backlog_records":
                y_label = table[0][1]
            rows = [(float(r[0]), int(r[1])) for r in table[1:] if r]
        if not rows:
            sys.exit(f"{path}: no samples")
        series.append((label, rows))
    x_max = max(r[-1][0] for _, r in series)
    y_max = max(max(n for _, n in r) for _, r in series) or 1
    x_step, y_step = nice_step(x_max), nice_step(y_max)
    x_top = x_step * (int(x_max / x_step) + 1)
    y_top = y_step * (int(y_max / y_step) + 1)
    px = lambda x: LEFT + (W - LEFT - RIGHT) * x / x_top
    py = lambda y: H - BOTTOM - (H - TOP - BOTTOM) * y / y_top
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
    ]
    y = 0
    while y <= y_top:
        svg.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>')
        svg.append(f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:,}</text>')
        y += y_step
    x = 0
    while x <= x_top:
        svg.append(f'<text x="{px(x):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{x:g}</text>')
        x += x_step
    svg.append(f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">seconds since the load started</text>')
    svg.append(f'<text x="16" y="{H / 2}" text-anchor="middle" transform="rotate(-90 16 {H / 2})">'
               f'{escape(y_label)}</text>')
    svg.append(f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" '
               'fill="none" stroke="#888"/>')
    for i, (label, rows) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(f"{px(t):.1f},{py(n):.1f}" for t, n in rows)
        svg.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        ly = TOP + 16 + 18 * i
        svg.append(f'<line x1="{LEFT + 12}" x2="{LEFT + 36}" y1="{ly - 4}" y2="{ly - 4}" '
                   f'stroke="{colour}" stroke-width="3"/>')
        svg.append(f'<text x="{LEFT + 42}" y="{ly}">{escape(label)}</text>')
    svg.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
