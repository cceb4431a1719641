//! Latency summaries and the figures of the result table.

use std::time::Duration;

/// Percentiles of a set of latencies.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Latency {
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
}

impl Latency {
    pub(crate) fn of(samples: &mut [Duration]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
        Latency {
            p50: at(0.50),
            p99: at(0.99),
        }
    }
}

/// `123 µs`, `4.56 ms`, `1.23 s`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// `12,345`.
pub(crate) fn fmt_count(n: f64) -> String {
    let s = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One row of the result table.
pub(crate) struct Row {
    pub(crate) scenario: &'static str,
    pub(crate) metric: String,
    pub(crate) value: String,
    pub(crate) reference: String,
    pub(crate) target: String,
}

impl Row {
    pub(crate) fn new(
        scenario: &'static str,
        metric: impl Into<String>,
        value: impl Into<String>,
    ) -> Row {
        Row {
            scenario,
            metric: metric.into(),
            value: value.into(),
            reference: String::new(),
            target: String::new(),
        }
    }

    pub(crate) fn vs(mut self, reference: impl Into<String>) -> Row {
        self.reference = reference.into();
        self
    }

    pub(crate) fn target(mut self, target: impl Into<String>) -> Row {
        self.target = target.into();
        self
    }
}

/// The table, in Markdown.
pub(crate) fn table(rows: &[Row]) -> String {
    let mut out =
        String::from("| scenario | metric | value | vs. limit | target |\n|---|---|---|---|---|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.scenario, r.metric, r.value, r.reference, r.target
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_formats() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(&mut v);
        assert_eq!(
            (l.p50, l.p99),
            (Duration::from_millis(51), Duration::from_millis(99))
        );
        assert_eq!(fmt_count(1234567.0), "1,234,567");
        assert_eq!(fmt_count(999.0), "999");
        assert_eq!(fmt_duration(Duration::from_micros(130)), "130 µs");
        assert_eq!(fmt_duration(Duration::from_micros(4560)), "4.56 ms");
    }
}
