//! Grouped bar charts as standalone SVG, for benchmark results: one group per row of a result table (a
//! scenario), one bar per series (ours, the study's, …). No plotting dependency: the charts are simple and
//! an SVG written by hand opens in every browser and renders on GitHub.

use std::fmt::Write as _;

/// One series: a name for the legend and a value per category (`None` = not measured, no bar).
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

pub struct Chart {
    pub title: String,
    /// Unit of the values, shown on the axis (`ms`, `req/s`, `MiB`).
    pub unit: String,
    pub categories: Vec<String>,
    pub series: Vec<Series>,
}

const COLORS: [&str; 6] = [
    "#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#6b7280",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis maximum (1, 2, 2.5 or 5 times a power of ten) at or above `max`.
fn nice_ceiling(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= max)
        .unwrap_or(10.0 * magnitude)
}

fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Chart {
    pub fn svg(&self) -> String {
        let bar_w = 18.0;
        let group_gap = 28.0;
        let n = self.series.len().max(1) as f64;
        let group_w = bar_w * n + group_gap;
        // Category labels are rotated by 30°: a label of L characters (~6 px each) reaches L·6·cos 30° to
        // the left of its group and L·6·sin 30° down.
        let longest = self
            .categories
            .iter()
            .map(|c| c.chars().count())
            .max()
            .unwrap_or(0) as f64;
        let (left, right, top) = ((5.3 * longest).max(70.0), 20.0, 50.0);
        let bottom = 40.0 + 3.2 * longest;
        let plot_h = 260.0;
        // Wide enough for the groups, and for the title (about 8 px per character at 14 px).
        let plot_w = (group_w * self.categories.len().max(1) as f64)
            .max(240.0)
            .max(self.title.chars().count() as f64 * 8.0 - left);
        let width = left + plot_w + right;
        let legend_h = 20.0 * self.series.len() as f64;
        let height = top + plot_h + bottom + legend_h;
        let max = self
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten())
            .fold(0.0f64, |a, b| a.max(*b));
        let ceiling = nice_ceiling(max);
        let y = |v: f64| top + plot_h - (v / ceiling * plot_h).clamp(0.0, plot_h);

        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(
            out,
            r#"<rect width="100%" height="100%" fill="white"/><text x="{:.0}" y="24" font-size="14" font-weight="bold">{}</text>"#,
            left,
            escape(&self.title)
        );
        for i in 0..=4 {
            let v = ceiling * i as f64 / 4.0;
            let yy = y(v);
            let _ = writeln!(
                out,
                r##"<line x1="{left}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + plot_w,
                left - 6.0,
                yy + 4.0,
                label(v)
            );
        }
        let _ = writeln!(
            out,
            r#"<text transform="translate({:.1} {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            left - 48.0,
            top + plot_h / 2.0,
            escape(&self.unit)
        );
        for (c, category) in self.categories.iter().enumerate() {
            let x0 = left + group_gap / 2.0 + c as f64 * group_w;
            for (s, series) in self.series.iter().enumerate() {
                let Some(v) = series.values.get(c).copied().flatten() else {
                    continue;
                };
                let x = x0 + s as f64 * bar_w;
                let _ = writeln!(
                    out,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {} {}</title></rect>"#,
                    y(v),
                    bar_w - 2.0,
                    top + plot_h - y(v),
                    COLORS[s % COLORS.len()],
                    escape(&series.name),
                    label(v),
                    escape(&self.unit)
                );
                let _ = writeln!(
                    out,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9">{}</text>"#,
                    x + (bar_w - 2.0) / 2.0,
                    y(v) - 3.0,
                    label(v)
                );
            }
            let cx = x0 + bar_w * n / 2.0;
            let _ = writeln!(
                out,
                r#"<text transform="translate({cx:.1} {:.1}) rotate(-30)" text-anchor="end">{}</text>"#,
                top + plot_h + 14.0,
                escape(category)
            );
        }
        let _ = writeln!(
            out,
            r#"<line x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
            left + plot_w,
            top + plot_h,
            top + plot_h
        );
        for (s, series) in self.series.iter().enumerate() {
            let ly = top + plot_h + bottom + 20.0 * s as f64;
            let _ = writeln!(
                out,
                r#"<rect x="{left}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                ly - 10.0,
                COLORS[s % COLORS.len()],
                left + 18.0,
                ly,
                escape(&series.name)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

/// Reads a CSV written by the benchmarks (a header row, comma-separated, no quoting) into a chart: one
/// category per row (the values of `category`, joined with ` / ` when several columns are named), one
/// series per `values` column. Cells that are not numbers (`-`, `n/a`, empty) are left out.
pub fn from_csv(
    text: &str,
    category: &[String],
    values: &[String],
    title: &str,
    unit: &str,
) -> anyhow::Result<Chart> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow::anyhow!("the CSV is empty (no header row)"))?
        .split(',')
        .map(str::trim)
        .collect();
    let column = |name: &str| -> anyhow::Result<usize> {
        header.iter().position(|h| *h == name).ok_or_else(|| {
            anyhow::anyhow!(
                "the CSV has no column `{name}`; its columns are: {}",
                header.join(", ")
            )
        })
    };
    let cat_cols = category
        .iter()
        .map(|c| column(c))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let val_cols = values
        .iter()
        .map(|c| column(c))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if val_cols.is_empty() {
        anyhow::bail!("name at least one value column (--value)");
    }
    let mut chart = Chart {
        title: title.to_owned(),
        unit: unit.to_owned(),
        categories: Vec::new(),
        series: values
            .iter()
            .map(|v| Series {
                name: v.clone(),
                values: Vec::new(),
            })
            .collect(),
    };
    for (n, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != header.len() {
            anyhow::bail!(
                "row {} has {} cells, the header has {}",
                n + 2,
                cells.len(),
                header.len()
            );
        }
        chart.categories.push(
            cat_cols
                .iter()
                .map(|&c| cells[c])
                .collect::<Vec<_>>()
                .join(" / "),
        );
        for (series, &c) in chart.series.iter_mut().zip(&val_cols) {
            series
                .values
                .push(cells[c].parse::<f64>().ok().filter(|v| v.is_finite()));
        }
    }
    Ok(chart)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csv_becomes_one_bar_per_measured_cell() {
        let csv = "placement,scenario,median_ms,study_median_ms\nintra,direct,0.24,-\nintra,minimal,1.13,7.88\n";
        let chart = from_csv(
            csv,
            &["scenario".into()],
            &["median_ms".into(), "study_median_ms".into()],
            "t",
            "ms",
        )
        .unwrap();
        assert_eq!(chart.categories, ["direct", "minimal"]);
        assert_eq!(chart.series[0].values, [Some(0.24), Some(1.13)]);
        assert_eq!(chart.series[1].values, [None, Some(7.88)]);
        let svg = chart.svg();
        // Three bars (the study has no figure for `direct`), a legend entry per series.
        assert_eq!(svg.matches("<rect x=").count(), 3 + 2);
        assert!(svg.contains("<title>study_median_ms: 7.88 ms</title>"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn bad_csvs_say_what_is_wrong() {
        let e = from_csv("a,b\n1,2\n", &["a".into()], &["c".into()], "t", "u")
            .err()
            .unwrap();
        assert!(e
            .to_string()
            .contains("no column `c`; its columns are: a, b"));
        let e = from_csv("a,b\n1,2,3\n", &["a".into()], &["b".into()], "t", "u")
            .err()
            .unwrap();
        assert!(e.to_string().contains("row 2 has 3 cells"));
        assert!(from_csv("", &[], &["b".into()], "t", "u").is_err());
    }

    #[test]
    fn labels_are_escaped_and_the_axis_is_round() {
        let chart = Chart {
            title: "<x & y>".into(),
            unit: "ms".into(),
            categories: vec!["a<b".into()],
            series: vec![Series {
                name: "s".into(),
                values: vec![Some(7.3)],
            }],
        };
        let svg = chart.svg();
        assert!(svg.contains("&lt;x &amp; y&gt;") && svg.contains("a&lt;b"));
        assert_eq!(nice_ceiling(7.3), 10.0);
        assert_eq!(nice_ceiling(0.9), 1.0);
        assert_eq!(nice_ceiling(21469.0), 25000.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
    }
}
