//! The classic Prometheus text format (0.0.4) from the OpenMetrics text `prometheus-client`
//! writes, for clients that do not ask for OpenMetrics (`curl`, `promtool check metrics`).

/// OpenMetrics text → Prometheus text 0.0.4 (see [`Metrics::encode_classic`]).
pub(super) fn to_classic(open: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for l in open.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.insert(name.to_owned());
        }
    }
    let mut out = String::with_capacity(open.len());
    for l in open.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| l.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{p}{name}_total {tail}"));
                } else {
                    out.push_str(l);
                }
            }
            None => out.push_str(l),
        }
        out.push('\n');
    }
    out
}
