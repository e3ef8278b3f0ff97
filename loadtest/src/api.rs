//! The server's HTTP API as the harness uses it: catalog, guest sign-up, admin credit, audit,
//! revenue, /api/me, /metrics; and the server's own memory and CPU from /proc.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
    admin: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct Sticker {
    pub id: String,
    pub price: u64,
}

#[derive(Deserialize, Debug, Clone)]
pub struct Guest {
    pub token: String,
    pub user_id: String,
    pub name: String,
    #[serde(default)]
    pub stream: Option<String>,
}

impl Api {
    pub fn new(base: &str, admin: Option<String>) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(16)
            .build()?;
        Ok(Api {
            base: base.trim_end_matches('/').to_string(),
            http,
            admin,
        })
    }

    pub fn has_admin(&self) -> bool {
        self.admin.is_some()
    }

    async fn check(resp: reqwest::Response, what: &str) -> Result<Value> {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "{what}: HTTP {status}: {}",
                body.chars().take(300).collect::<String>()
            );
        }
        serde_json::from_str(&body).with_context(|| format!("{what}: bad JSON"))
    }

    fn admin_token(&self) -> Result<&str> {
        self.admin
            .as_deref()
            .ok_or_else(|| anyhow!("--admin-token is required for this"))
    }

    pub async fn catalog(&self) -> Result<Vec<Sticker>> {
        let v = Self::check(
            self.http
                .get(format!("{}/api/catalog", self.base))
                .send()
                .await?,
            "GET /api/catalog",
        )
        .await?;
        let s: Vec<Sticker> =
            serde_json::from_value(v.get("stickers").cloned().unwrap_or(Value::Null))
                .context("catalog: no stickers")?;
        Ok(s)
    }

    pub async fn guest(&self, name: &str, role: &str) -> Result<Guest> {
        let v = Self::check(
            self.http
                .post(format!("{}/api/guest", self.base))
                .json(&json!({"name": name, "role": role}))
                .send()
                .await?,
            "POST /api/guest",
        )
        .await?;
        Ok(serde_json::from_value(v)?)
    }

    /// Credit coins (idempotent on `reference`); returns the new balance.
    pub async fn credit(&self, user_id: &str, coins: u64, reference: &str) -> Result<i64> {
        let v = Self::check(
            self.http
                .post(format!("{}/api/admin/credit", self.base))
                .bearer_auth(self.admin_token()?)
                .json(&json!({"user_id": user_id, "coins": coins, "reference": reference}))
                .send()
                .await?,
            "POST /api/admin/credit",
        )
        .await?;
        v.get("balance")
            .and_then(Value::as_i64)
            .ok_or_else(|| anyhow!("credit: no balance in {v}"))
    }

    pub async fn audit(&self) -> Result<Value> {
        Self::check(
            self.http
                .get(format!("{}/api/admin/audit", self.base))
                .bearer_auth(self.admin_token()?)
                .send()
                .await?,
            "GET /api/admin/audit",
        )
        .await
    }

    /// Revenue of a stream; Ok(None) when the server answers 404 (no such stream yet).
    pub async fn revenue(&self, stream: &str) -> Result<Option<Value>> {
        let resp = self
            .http
            .get(format!("{}/api/streams/{}/revenue", self.base, stream))
            .bearer_auth(self.admin_token()?)
            .send()
            .await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(
            Self::check(resp, "GET /api/streams/{id}/revenue").await?,
        ))
    }

    pub async fn me_balance(&self, token: &str) -> Result<i64> {
        let v = Self::check(
            self.http
                .get(format!("{}/api/me", self.base))
                .bearer_auth(token)
                .send()
                .await?,
            "GET /api/me",
        )
        .await?;
        v.get("balance")
            .and_then(Value::as_i64)
            .ok_or_else(|| anyhow!("/api/me: no balance in {v}"))
    }

    /// Prometheus text from /metrics, if the server exposes it.
    pub async fn metrics(&self) -> Option<String> {
        let r = self
            .http
            .get(format!("{}/metrics", self.base))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.text().await.ok()
    }
}

/// Unlabelled sample values of a Prometheus text exposition, by metric name.
pub fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut it = line.split_whitespace();
        let (Some(name), Some(val)) = (it.next(), it.next()) else {
            continue;
        };
        if name.contains('{') {
            continue;
        }
        if let Ok(v) = val.parse::<f64>() {
            out.insert(name.to_string(), v);
        }
    }
    out
}

/// Resident memory and CPU seconds of a process.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ProcSample {
    pub rss_bytes: Option<u64>,
    pub cpu_secs: Option<f64>,
}

pub fn proc_sample(pid: u32) -> ProcSample {
    let rss_bytes = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| parse_vmrss(&s));
    let cpu_secs = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat_cpu(&s));
    ProcSample {
        rss_bytes,
        cpu_secs,
    }
}

pub fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// utime + stime of /proc/<pid>/stat in seconds (assuming 100 ticks/s, Linux's USER_HZ).
pub fn parse_stat_cpu(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // after "pid (comm) ": state is field 3 → index 0; utime is field 14 → index 11.
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / 100.0)
}

/// Sample a server: /proc when the pid is known (several pids: the sum, e.g. the nodes of a
/// local cluster), else /metrics of the first URL.
pub async fn server_sample(api: &Api, pids: &[u32]) -> ProcSample {
    if !pids.is_empty() {
        return sum_samples(pids.iter().map(|p| proc_sample(*p)));
    }
    match api.metrics().await {
        Some(t) => {
            let m = parse_prometheus(&t);
            ProcSample {
                rss_bytes: m.get("process_resident_memory_bytes").map(|v| *v as u64),
                cpu_secs: m.get("process_cpu_seconds_total").copied(),
            }
        }
        None => ProcSample::default(),
    }
}

/// Sum of several processes' samples; unknown when any part is unknown.
pub fn sum_samples(parts: impl IntoIterator<Item = ProcSample>) -> ProcSample {
    let mut out = ProcSample {
        rss_bytes: Some(0),
        cpu_secs: Some(0.0),
    };
    for p in parts {
        out.rss_bytes = out.rss_bytes.zip(p.rss_bytes).map(|(a, b)| a + b);
        out.cpu_secs = out.cpu_secs.zip(p.cpu_secs).map(|(a, b)| a + b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_add_up() {
        let a = ProcSample {
            rss_bytes: Some(10),
            cpu_secs: Some(1.5),
        };
        let b = ProcSample {
            rss_bytes: Some(5),
            cpu_secs: Some(0.5),
        };
        assert_eq!(
            sum_samples([a, b]),
            ProcSample {
                rss_bytes: Some(15),
                cpu_secs: Some(2.0)
            }
        );
        assert_eq!(
            sum_samples([
                a,
                ProcSample {
                    rss_bytes: None,
                    cpu_secs: Some(1.0)
                }
            ])
            .rss_bytes,
            None
        );
    }

    #[test]
    fn prometheus_parsing() {
        let t = "# HELP x\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes 1.5e7\nprocess_cpu_seconds_total 12.5\nfoo{a=\"b\"} 3\n";
        let m = parse_prometheus(t);
        assert_eq!(m["process_resident_memory_bytes"], 15_000_000.0);
        assert_eq!(m["process_cpu_seconds_total"], 12.5);
        assert!(!m.contains_key("foo"));
    }

    #[test]
    fn proc_parsing() {
        assert_eq!(
            parse_vmrss("Name:\tx\nVmRSS:\t  2048 kB\n"),
            Some(2048 * 1024)
        );
        let stat = "123 (my prog) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0";
        assert_eq!(parse_stat_cpu(stat), Some(4.0));
        let me = proc_sample(std::process::id());
        assert!(me.rss_bytes.unwrap() > 0);
        assert!(me.cpu_secs.is_some());
    }
}
