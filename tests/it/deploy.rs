//! The deployment files against a live adbeacon: every metric the Grafana dashboards and the
//! Prometheus alert rules use is one the service exports, and the container health check of the
//! Dockerfile and docker-compose.yml passes against a serving adbeacon (and fails without one).
//! The rest of deploy/ is checked statically by scripts/check-deploy.sh.

use std::{collections::BTreeSet, path::Path, process::Command};

use serde_json::{Value, json};

use crate::support::TestApp;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Metric names in a PromQL expression: identifiers starting `adbeacon_` or `http_`, and `up`
/// (string literals such as label values are skipped).
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let mut unquoted = String::new();
    let mut quote = None;
    for c in expr.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
            None => unquoted.push(c),
        }
    }
    for word in unquoted.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        if word.starts_with("adbeacon_") || word.starts_with("http_") || word == "up" {
            into.insert(word.to_string());
        }
    }
}

/// Every `expr` of a dashboard, however deep (rows hold panels, panels hold targets).
fn dashboard_exprs(v: &Value, into: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => into.push(e.clone()),
                    _ => dashboard_exprs(v, into),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| dashboard_exprs(i, into)),
        _ => {}
    }
}

/// Every `expr:` of a Prometheus rules file: inline, or a block scalar (`expr: |`) whose lines
/// are indented deeper than the key.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else { continue };
        let indent = line.len() - line.trim_start().len();
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let mut block = String::new();
            while let Some(next) = lines.peek() {
                if !next.trim().is_empty() && next.len() - next.trim_start().len() <= indent {
                    break;
                }
                block.push_str(next.trim());
                block.push('\n');
                lines.next();
            }
            exprs.push(block);
        } else {
            exprs.push(rest.to_string());
        }
    }
    exprs
}

/// Family names on `/metrics` with their types, from the `# TYPE` lines.
fn exported(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
        .collect()
}

#[tokio::test]
async fn every_metric_of_the_dashboards_and_alerts_is_exported() {
    let app = TestApp::spawn().await;
    let ad = "11111111-1111-1111-1111-111111111111";
    assert_eq!(app.post("/ads/impression", &json!({"adId": ad})).await.status(), 204);
    assert_eq!(app.post("/ads/click", &json!({"adId": ad})).await.status(), 202);
    // One refused tracking event and one refused catalog request, so both labelled families
    // have a series.
    assert_eq!(app.post_raw("/ads/click", "application/json", "{not json").await.status(), 400);
    assert_eq!(app.post_raw("/ads", "application/json", "{not json").await.status(), 400);
    assert_eq!(app.wait_flushed(2).await, 2, "both events flushed");
    let text = app.get("/metrics").await.text().await.unwrap();
    let families = exported(&text);
    assert!(families.len() > 10, "too few metrics on /metrics:\n{text}");

    let mut exprs = Vec::new();
    let dashboards = Path::new(ROOT).join("deploy/grafana/dashboards");
    let mut files = 0;
    for entry in std::fs::read_dir(&dashboards).expect("deploy/grafana/dashboards") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            dashboard_exprs(&dash, &mut exprs);
            files += 1;
        }
    }
    assert!(files > 0, "no dashboards in {}", dashboards.display());
    let rules = std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/alerts.yml")).unwrap();
    let rule_count = rule_exprs(&rules).len();
    assert!(rule_count >= 10, "only {rule_count} alert expressions found in alerts.yml");
    exprs.extend(rule_exprs(&rules));

    let mut used = BTreeSet::new();
    for e in &exprs {
        metric_names(e, &mut used);
    }
    assert!(used.len() >= 15, "only {} metric names found: {used:?}", used.len());
    let missing: Vec<_> = used
        .iter()
        .filter(|name| {
            // `up` is made by Prometheus for every scrape target.
            if *name == "up" {
                return false;
            }
            !families.iter().any(|(family, kind)| {
                *name == family
                    || (kind == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|suffix| name.strip_suffix(suffix) == Some(family.as_str())))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboards or alert rules use metrics adbeacon does not export: {missing:?}\n\
         exported: {:?}",
        families.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
}

/// The `CMD` array of the Dockerfile's HEALTHCHECK and the adbeacon `healthcheck.test` of
/// docker-compose.yml (a flow sequence of double-quoted strings, so JSON).
fn health_checks() -> (Vec<String>, Vec<String>) {
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let joined = dockerfile.replace("\\\n", " ");
    let line = joined.lines().find(|l| l.trim_start().starts_with("HEALTHCHECK")).expect("a HEALTHCHECK");
    let docker: Vec<String> =
        serde_json::from_str(line.split_once("CMD").expect("HEALTHCHECK … CMD [...]").1.trim()).unwrap();
    let compose = std::fs::read_to_string(Path::new(ROOT).join("docker-compose.yml")).unwrap();
    let line = compose
        .lines()
        .find(|l| l.trim_start().starts_with("test:") && l.contains("/healthz"))
        .expect("an adbeacon healthcheck on /healthz");
    let compose: Vec<String> = serde_json::from_str(line.split_once("test:").unwrap().1.trim()).unwrap();
    (docker, compose)
}

#[tokio::test]
async fn the_container_health_check_passes_against_a_serving_adbeacon() {
    let (docker, compose) = health_checks();
    assert_eq!(docker[0], "bash", "{docker:?}");
    assert_eq!(&compose[..], &[&["CMD".to_string()][..], &docker[..]].concat()[..], "the same check");
    let mut app = TestApp::spawn().await;
    let port = app.base.rsplit(':').next().unwrap().to_string();
    // On the blocking pool: the app serves on this test's runtime, which must keep running.
    let run = |port: String| {
        let (shell, flag, script) = (docker[0].clone(), docker[1].clone(), docker[2].clone());
        tokio::task::spawn_blocking(move || {
            let ours = script.replace("/dev/tcp/127.0.0.1/8080", &format!("/dev/tcp/127.0.0.1/{port}"));
            assert_ne!(ours, script, "the check targets 127.0.0.1:8080");
            Command::new(shell).arg(flag).arg(ours).status().expect("bash runs")
        })
    };
    assert!(run(port.clone()).await.unwrap().success(), "the health check fails against a serving adbeacon");
    // A port nobody listens on: the one the app had before it stopped.
    app.stop().await.expect("clean stop");
    assert!(!run(port).await.unwrap().success(), "the health check passes with no adbeacon");
}
