//! Reporting: percentiles, number formats and the plain-text tables every benchmark prints.

use std::time::Duration;

/// Nearest-rank percentiles of a set of durations.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Percentiles {
    pub(crate) n: usize,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) max: Duration,
}

impl Percentiles {
    pub(crate) fn of(samples: &[Duration]) -> Percentiles {
        let mut sorted = samples.to_vec();
        sorted.sort();
        let at = |pct: f64| {
            if sorted.is_empty() {
                return Duration::ZERO;
            }
            let rank = ((pct / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted[rank.clamp(1, sorted.len()) - 1]
        };
        Percentiles { n: sorted.len(), p50: at(50.0), p99: at(99.0), max: sorted.last().copied().unwrap_or_default() }
    }
}

pub(crate) fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 10.0 {
        format!("{us:.1} µs")
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

pub(crate) fn fmt_count(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(crate) fn fmt_ratio(r: f64) -> String {
    if !r.is_finite() {
        "—".into()
    } else if r >= 100.0 {
        format!("{r:.0}×")
    } else if r >= 10.0 {
        format!("{r:.1}×")
    } else {
        format!("{r:.2}×")
    }
}

pub(crate) fn met(ok: bool) -> String {
    if ok { "yes".into() } else { "NO".into() }
}

/// A plain-text table, columns separated by ` | `.
pub(crate) struct Table {
    pub(crate) head: Vec<String>,
    pub(crate) rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(head: &[&str]) -> Table {
        Table { head: head.iter().map(|s| (*s).to_owned()).collect(), rows: Vec::new() }
    }

    /// The verdict table every benchmark ends with.
    pub(crate) fn verdicts() -> Table {
        Table::new(&["metric", "ours", "baseline", "ratio", "goal", "met?"])
    }

    pub(crate) fn row(&mut self, cells: impl IntoIterator<Item = String>) {
        self.rows.push(cells.into_iter().collect());
    }

    pub(crate) fn print(&self) {
        let cols = self.head.len();
        let mut widths: Vec<usize> = self.head.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let padded: Vec<String> = (0..cols)
                .map(|i| {
                    let cell = cells.get(i).map_or("", String::as_str);
                    format!("{cell}{}", " ".repeat(widths[i] - cell.chars().count()))
                })
                .collect();
            println!("  {}", padded.join(" | ").trim_end());
        };
        line(&self.head);
        println!("  {}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("-+-"));
        for row in &self.rows {
            line(row);
        }
    }
}

pub(crate) fn title(text: &str) {
    println!("\n{text}\n{}", "=".repeat(text.chars().count()));
}

pub(crate) fn note(text: impl AsRef<str>) {
    println!("  {}", text.as_ref());
}
