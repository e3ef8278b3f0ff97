#!/usr/bin/env python3
"""Draws latency percentiles of several runs as one SVG chart (log scale), standard library only.

    python3 docs/bench/plot_percentiles.py OUT.svg "TITLE" POINTS VARIANT:RUN=V1,V2,... [...]

POINTS names the percentiles, comma separated (e.g. p50,p90,p99,p99.9,max); each run gives one
value in ms per point. Runs of the same VARIANT share a colour, so runs alternated in one session
read as two bands.
"""
import math
import sys
from html import escape

W, H = 760, 380
LEFT, RIGHT, TOP, BOTTOM = 70, 250, 40, 50
COLOURS = ["#c0392b", "#2471a3", "#27ae60", "#8e44ad"]


def main():
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    out, title, points = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    runs = []
    for arg in sys.argv[4:]:
        name, _, values = arg.partition("=")
        variant, _, run = name.partition(":")
        vals = [float(v) for v in values.split(",")]
        if len(vals) != len(points):
            sys.exit(f"{name}: {len(vals)} values for {len(points)} points")
        runs.append((variant, run, vals))
    variants = list(dict.fromkeys(v for v, _, _ in runs))
    lo = min(min(v) for _, _, v in runs)
    hi = max(max(v) for _, _, v in runs)
    y0, y1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if y0 == y1:
        y1 += 1
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def x(i):
        return LEFT + pw * i / max(1, len(points) - 1)

    def y(v):
        return TOP + ph * (1 - (math.log10(v) - y0) / (y1 - y0))

    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>',
    ]
    for e in range(y0, y1 + 1):
        for m in (1, 2, 5):
            v = m * 10**e
            if v < 10**y0 or v > 10**y1:
                continue
            yy = y(v)
            svg.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#ddd"/>')
            label = f"{v:g}"
            svg.append(f'<text x="{LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end">{label}</text>')
    svg.append(
        f'<text x="16" y="{TOP + ph / 2}" transform="rotate(-90 16 {TOP + ph / 2})" text-anchor="middle">ms (log scale)</text>'
    )
    for i, p in enumerate(points):
        svg.append(f'<text x="{x(i):.1f}" y="{TOP + ph + 20}" text-anchor="middle">{escape(p)}</text>')
    for variant, run, vals in runs:
        colour = COLOURS[variants.index(variant) % len(COLOURS)]
        path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(vals))
        svg.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.6" opacity="0.85"/>')
        for i, v in enumerate(vals):
            svg.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}"/>')
    for k, variant in enumerate(variants):
        colour = COLOURS[k % len(COLOURS)]
        yy = TOP + 10 + 20 * k
        n = sum(1 for v, _, _ in runs if v == variant)
        svg.append(f'<line x1="{LEFT + pw + 14}" x2="{LEFT + pw + 34}" y1="{yy}" y2="{yy}" stroke="{colour}" stroke-width="3"/>')
        svg.append(f'<text x="{LEFT + pw + 40}" y="{yy + 4}">{escape(variant)} ({n} runs)</text>')
    svg.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
