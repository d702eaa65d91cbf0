//! Calls to the LEM-compatible API, made and printed the way a LEM script
//! makes them: plain HTTP with nothing but `X-AuthToken`.

use anyhow::Context;
use edgekeep_api::{AUTH_TOKEN_HEADER, JOB_ID_HEADER};
use reqwest::Method;
use serde_json::Value;

pub struct LemClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// A response: status, envelope and the job id header if present.
pub struct LemResponse {
    pub status: u16,
    pub body: Value,
    pub job_id: Option<i64>,
}

impl LemResponse {
    /// Returns the envelope's content, or an error naming the call if it failed.
    pub fn content(&self, call: &str) -> anyhow::Result<&Value> {
        if self.status != 200 {
            anyhow::bail!("{call} returned {}: {}", self.status, self.body);
        }
        Ok(&self.body["content"])
    }
}

impl LemClient {
    pub fn new(base: &str, token: &str) -> Self {
        LemClient {
            http: reqwest::Client::new(),
            base: base.to_string(),
            token: token.to_string(),
        }
    }

    /// Sends the call and prints it and its result; `quiet` prints nothing
    /// (for polls after the first).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        quiet: bool,
    ) -> anyhow::Result<LemResponse> {
        let query_text = query
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let request_line = if query_text.is_empty() {
            format!("{method} {path}")
        } else {
            format!("{method} {path}?{query_text}")
        };
        let response = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(AUTH_TOKEN_HEADER, &self.token)
            .query(query)
            .send()
            .await
            .with_context(|| format!("{request_line} failed"))?;
        let status = response.status().as_u16();
        let job_id = response
            .headers()
            .get(JOB_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("{request_line} returned a body that is not JSON"))?;
        if !quiet {
            println!("  > {request_line}");
            println!(
                "  < {status} {}",
                shorten(&redact_signatures(&body.to_string()))
            );
        }
        Ok(LemResponse {
            status,
            body,
            job_id,
        })
    }
}

/// Replaces the value of every `X-Amz-Signature` in `text`, so printed URLs
/// show their shape but cannot be used.
pub fn redact_signatures(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("X-Amz-Signature=") {
        let value_start = at + "X-Amz-Signature=".len();
        out.push_str(&rest[..value_start]);
        out.push_str("<redacted>");
        let value_len = rest[value_start..]
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(rest.len() - value_start);
        rest = &rest[value_start + value_len..];
    }
    out.push_str(rest);
    out
}

fn shorten(text: &str) -> String {
    const MAX: usize = 400;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut cut = MAX;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}... ({} bytes)", &text[..cut], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_signatures_hides_every_signature() {
        let text = "a?X-Amz-Expires=604800&X-Amz-Signature=abc123 b?X-Amz-Signature=ff\"";
        assert_eq!(
            redact_signatures(text),
            "a?X-Amz-Expires=604800&X-Amz-Signature=<redacted> b?X-Amz-Signature=<redacted>\""
        );
    }
}
