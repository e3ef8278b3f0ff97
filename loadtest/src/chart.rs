//! SVG chart of a report: throughput and latency over time (plotters, SVG backend only).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::report::Report;

const SERIES_RATE: &[(&str, &str)] = &[
    ("deliveries", "deliveries/s"),
    ("chats_sent", "chats sent/s"),
    ("shoutouts", "shout-outs received/s"),
    ("gifts_ok", "gift acks/s"),
    ("joins", "joins/s"),
];
const SERIES_LAT: &[(&str, &str)] = &[
    ("chat", "chat"),
    ("shoutout", "shout-out"),
    ("gift_ack", "gift ack"),
    ("thanks", "thanks"),
];
const COLORS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

pub fn write_svg(report: &Report, path: &Path) -> Result<()> {
    let svg = render_svg(report)?;
    std::fs::write(path, svg)?;
    Ok(())
}

/// Render the chart to an SVG string.
pub fn render_svg(report: &Report) -> Result<String> {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (1100, 760)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let title = format!(
            "giftcast loadtest: {} (run {}, {} proc)",
            report.scenario, report.run_id, report.procs
        );
        let root = root
            .titled(&title, ("sans-serif", 20))
            .map_err(|e| anyhow!("{e}"))?;
        let (top, bottom) = root.split_vertically(360);
        let pts: Vec<&crate::report::Sample> = report
            .timeline
            .iter()
            .filter(|s| s.phase != "connect" && s.secs > 0.0)
            .collect();
        let x_max = pts.iter().map(|s| s.t_secs).fold(1.0, f64::max);
        let x_min = pts.iter().map(|s| s.t_secs).fold(0.0, f64::min);

        // Throughput.
        let y_max = pts
            .iter()
            .flat_map(|s| SERIES_RATE.iter().map(move |(k, _)| s.rate(k)))
            .fold(1.0, f64::max)
            * 1.1;
        let mut ch = ChartBuilder::on(&top)
            .margin(12)
            .caption("throughput (per second)", ("sans-serif", 16))
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(x_min..x_max, 0.0..y_max)
            .map_err(|e| anyhow!("{e}"))?;
        ch.configure_mesh()
            .x_desc("seconds since run start")
            .y_label_formatter(&|v| crate::report::human(*v))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, (k, label)) in SERIES_RATE.iter().enumerate() {
            if !pts.iter().any(|s| s.rate(k) > 0.0) {
                continue;
            }
            let color = COLORS[i % COLORS.len()];
            ch.draw_series(LineSeries::new(
                pts.iter().map(|s| (s.t_secs, s.rate(k))),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label(*label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        }
        ch.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;

        // Latency.
        let lat = |s: &crate::report::Sample, k: &str, q: u8| {
            s.latency_ms
                .get(k)
                .map(|l| if q == 50 { l.p50_ms } else { l.p99_ms })
                .unwrap_or(0.0)
        };
        let ly_max = pts
            .iter()
            .flat_map(|s| SERIES_LAT.iter().map(move |(k, _)| lat(s, k, 99)))
            .fold(1.0, f64::max)
            * 1.1;
        let mut ch = ChartBuilder::on(&bottom)
            .margin(12)
            .caption(
                "end-to-end latency (ms): p50 dashed, p99 solid",
                ("sans-serif", 16),
            )
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(x_min..x_max, 0.0..ly_max)
            .map_err(|e| anyhow!("{e}"))?;
        ch.configure_mesh()
            .x_desc("seconds since run start")
            .y_desc("ms")
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, (k, label)) in SERIES_LAT.iter().enumerate() {
            let with: Vec<&&crate::report::Sample> = pts
                .iter()
                .filter(|s| s.latency_ms.contains_key(*k))
                .collect();
            if with.is_empty() {
                continue;
            }
            let color = COLORS[i % COLORS.len()];
            ch.draw_series(LineSeries::new(
                with.iter().map(|s| (s.t_secs, lat(s, k, 99))),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label(format!("{label} p99"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
            ch.draw_series(DashedLineSeries::new(
                with.iter().map(|s| (s.t_secs, lat(s, k, 50))),
                6,
                4,
                color.stroke_width(1),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        }
        ch.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Sample;
    use crate::stats::LatencySummary;

    #[test]
    fn renders_an_svg() {
        let mut r = Report {
            scenario: "fanout".into(),
            run_id: "t".into(),
            procs: 1,
            ..Default::default()
        };
        for i in 0..5 {
            let mut s = Sample {
                phase: "run".into(),
                t_secs: i as f64 + 1.0,
                secs: 1.0,
                ..Default::default()
            };
            s.counters.insert("deliveries".into(), 1000 * (i + 1));
            s.latency_ms.insert(
                "chat".into(),
                LatencySummary {
                    count: 10,
                    p50_ms: 1.0 + i as f64,
                    p99_ms: 5.0 + i as f64,
                    ..Default::default()
                },
            );
            r.timeline.push(s);
        }
        let svg = render_svg(&r).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("deliveries/s"));
        assert!(svg.contains("<polyline") || svg.contains("<path"));
    }

    #[test]
    fn renders_empty_report() {
        let svg = render_svg(&Report::default()).unwrap();
        assert!(svg.contains("</svg>"));
    }
}
