//! HTTP clients for the REST API ([`Client`]) and the agent protocol
//! ([`AgentClient`]).

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::agent::{
    ActivateRequest, ActivateResponse, AgentJob, DeviceFacts, JobResult, PROTOCOL_HEADER,
    PROTOCOL_VERSION, ProgressReply, ProgressReport,
};
use crate::model::*;
use crate::{AUTH_TOKEN_HEADER, JOB_ID_HEADER};

/// A failed call: the HTTP status (0 when no response arrived) and the
/// server's message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    fn transport(url: &str, err: reqwest::Error) -> Self {
        ApiError {
            status: 0,
            message: format!("request to {url} failed: {err}; check that the server is running"),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Sends the request and unwraps the envelope, returning its content and the
/// job id header if present.
async fn send<T: DeserializeOwned>(
    request: RequestBuilder,
    url: &str,
) -> ApiResult<(Option<T>, Option<i64>)> {
    let response = request
        .send()
        .await
        .map_err(|e| ApiError::transport(url, e))?;
    unwrap_envelope(response, url).await
}

async fn unwrap_envelope<T: DeserializeOwned>(
    response: Response,
    url: &str,
) -> ApiResult<(Option<T>, Option<i64>)> {
    let status = response.status();
    let job_id = response
        .headers()
        .get(JOB_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = response
        .bytes()
        .await
        .map_err(|e| ApiError::transport(url, e))?;
    let envelope: Envelope<T> = serde_json::from_slice(&body).map_err(|e| ApiError {
        status: status.as_u16(),
        message: format!(
            "{url} returned HTTP {status} with a body that is not an edgekeep envelope ({e}): {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ),
    })?;
    if !status.is_success() {
        return Err(ApiError {
            status: status.as_u16(),
            message: envelope
                .message
                .unwrap_or_else(|| format!("{url} returned HTTP {status}")),
        });
    }
    Ok((envelope.content, job_id))
}

fn required<T>(content: Option<T>, url: &str) -> ApiResult<T> {
    content.ok_or_else(|| ApiError {
        status: 200,
        message: format!("{url} returned no content"),
    })
}

/// A REST API client that authenticates with an `X-AuthToken` token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    /// Creates a client for the server at `base_url`, such as
    /// `http://127.0.0.1:8080`.
    pub fn new(base_url: &str, token: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("the TLS backend initialises");
        Client {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> (RequestBuilder, String) {
        let url = format!("{}{}", self.base, path);
        let builder = self
            .http
            .request(method, &url)
            .header(AUTH_TOKEN_HEADER, &self.token);
        (builder, url)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> ApiResult<(Option<T>, Option<i64>)> {
        let (mut builder, url) = self.request(method, path);
        builder = builder.query(query);
        if let Some(body) = body {
            builder = builder.json(body);
        }
        send(builder, &url).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str, query: &[(&str, String)]) -> ApiResult<T> {
        let (content, _) = self.call(Method::GET, path, query, None::<&()>).await?;
        required(content, path)
    }

    // LEM-compatible backup endpoints.

    /// `POST /api/v1/backup/init-backup`; returns the queued job's id.
    pub async fn init_backup(&self, project_id: i64, device_id: i64) -> ApiResult<Option<i64>> {
        let query = [
            ("projectId", project_id.to_string()),
            ("deviceId", device_id.to_string()),
        ];
        let (_, job): (Option<serde_json::Value>, _) = self
            .call(
                Method::POST,
                "/api/v1/backup/init-backup",
                &query,
                None::<&()>,
            )
            .await?;
        Ok(job)
    }

    /// `GET /api/v1/backup/list`: complete backups, newest first.
    pub async fn list_backups(&self, project_id: i64, device_id: i64) -> ApiResult<Vec<Backup>> {
        let query = [
            ("projectId", project_id.to_string()),
            ("deviceId", device_id.to_string()),
        ];
        self.get("/api/v1/backup/list", &query).await
    }

    /// `POST /api/v1/backup/get`: a pre-signed download URL valid 7 days.
    pub async fn download_url(
        &self,
        project_id: i64,
        device_id: i64,
        backup_type: &str,
        timestamp: i64,
    ) -> ApiResult<String> {
        let query = [
            ("projectId", project_id.to_string()),
            ("deviceId", device_id.to_string()),
            ("backupType", backup_type.to_string()),
            ("timestamp", timestamp.to_string()),
        ];
        let (content, _) = self
            .call(Method::POST, "/api/v1/backup/get", &query, None::<&()>)
            .await?;
        required(content, "/api/v1/backup/get")
    }

    /// `POST /api/v1/backup/put`: a pre-signed upload URL, and the id of the
    /// import job that validates the uploaded file.
    pub async fn upload_url(
        &self,
        project_id: i64,
        device_id: i64,
        backup_type: &str,
        timestamp: Option<i64>,
    ) -> ApiResult<(String, Option<i64>)> {
        let mut query = vec![
            ("projectId", project_id.to_string()),
            ("deviceId", device_id.to_string()),
            ("backupType", backup_type.to_string()),
        ];
        if let Some(timestamp) = timestamp {
            query.push(("timestamp", timestamp.to_string()));
        }
        let (content, job) = self
            .call(Method::POST, "/api/v1/backup/put", &query, None::<&()>)
            .await?;
        Ok((required(content, "/api/v1/backup/put")?, job))
    }

    /// `POST /api/v1/backup/init-restore` onto `device_id`; returns the
    /// queued job's id.
    pub async fn init_restore(
        &self,
        project_id: i64,
        device_id: i64,
        backup_type: &str,
        timestamp: i64,
        source_device_id: Option<i64>,
    ) -> ApiResult<Option<i64>> {
        let mut query = vec![
            ("projectId", project_id.to_string()),
            ("deviceId", device_id.to_string()),
            ("backupType", backup_type.to_string()),
            ("timestamp", timestamp.to_string()),
        ];
        if let Some(source) = source_device_id {
            query.push(("sourceDeviceId", source.to_string()));
        }
        let (_, job): (Option<serde_json::Value>, _) = self
            .call(
                Method::POST,
                "/api/v1/backup/init-restore",
                &query,
                None::<&()>,
            )
            .await?;
        Ok(job)
    }

    // Projects, devices, jobs and tokens.

    pub async fn create_project(&self, name: &str) -> ApiResult<Project> {
        let body = CreateProject {
            name: name.to_string(),
        };
        let (content, _) = self
            .call(Method::POST, "/api/v1/projects", &[], Some(&body))
            .await?;
        required(content, "/api/v1/projects")
    }

    pub async fn list_projects(&self) -> ApiResult<Vec<Project>> {
        self.get("/api/v1/projects", &[]).await
    }

    pub async fn create_device(&self, project_id: i64, name: &str) -> ApiResult<DeviceActivation> {
        let path = format!("/api/v1/projects/{project_id}/devices");
        let body = CreateDevice {
            name: name.to_string(),
        };
        let (content, _) = self.call(Method::POST, &path, &[], Some(&body)).await?;
        required(content, &path)
    }

    /// Issues a new activation code, for example for a replaced device.
    pub async fn new_activation_code(
        &self,
        project_id: i64,
        device_id: i64,
    ) -> ApiResult<DeviceActivation> {
        let path = format!("/api/v1/projects/{project_id}/devices/{device_id}/activation-code");
        let (content, _) = self.call(Method::POST, &path, &[], None::<&()>).await?;
        required(content, &path)
    }

    pub async fn list_devices(&self, project_id: i64) -> ApiResult<Vec<Device>> {
        self.get(&format!("/api/v1/projects/{project_id}/devices"), &[])
            .await
    }

    pub async fn device(&self, project_id: i64, device_id: i64) -> ApiResult<Device> {
        self.get(
            &format!("/api/v1/projects/{project_id}/devices/{device_id}"),
            &[],
        )
        .await
    }

    /// Lists jobs newest first, optionally of one project, device or state.
    pub async fn list_jobs(
        &self,
        project_id: Option<i64>,
        device_id: Option<i64>,
        state: Option<JobState>,
    ) -> ApiResult<Vec<Job>> {
        let mut query = Vec::new();
        if let Some(project) = project_id {
            query.push(("projectId", project.to_string()));
        }
        if let Some(device) = device_id {
            query.push(("deviceId", device.to_string()));
        }
        if let Some(state) = state {
            query.push(("state", state.as_str().to_string()));
        }
        self.get("/api/v1/jobs", &query).await
    }

    pub async fn job(&self, job_id: i64) -> ApiResult<Job> {
        self.get(&format!("/api/v1/jobs/{job_id}"), &[]).await
    }

    pub async fn cancel_job(&self, job_id: i64) -> ApiResult<Job> {
        let path = format!("/api/v1/jobs/{job_id}/cancel");
        let (content, _) = self.call(Method::POST, &path, &[], None::<&()>).await?;
        required(content, &path)
    }

    pub async fn create_token(&self, request: &CreateToken) -> ApiResult<CreatedToken> {
        let (content, _) = self
            .call(Method::POST, "/api/v1/tokens", &[], Some(request))
            .await?;
        required(content, "/api/v1/tokens")
    }

    pub async fn list_tokens(&self) -> ApiResult<Vec<TokenInfo>> {
        self.get("/api/v1/tokens", &[]).await
    }

    pub async fn revoke_token(&self, token_id: i64) -> ApiResult<()> {
        let path = format!("/api/v1/tokens/{token_id}");
        let _: (Option<serde_json::Value>, _) =
            self.call(Method::DELETE, &path, &[], None::<&()>).await?;
        Ok(())
    }

    /// Polls a job every `interval` until it reaches a final state, calling
    /// `on_update` with each new reading.
    pub async fn wait_for_job(
        &self,
        job_id: i64,
        interval: Duration,
        mut on_update: impl FnMut(&Job),
    ) -> ApiResult<Job> {
        loop {
            let job = self.job(job_id).await?;
            on_update(&job);
            if job.state.is_final() {
                return Ok(job);
            }
            tokio::time::sleep(interval).await;
        }
    }
}

/// Client of the agent protocol, used by `edgekeep agent`.
#[derive(Debug, Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    base: String,
    credential: Option<String>,
}

impl AgentClient {
    pub fn new(base_url: &str, credential: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("the TLS backend initialises");
        AgentClient {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            credential,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn set_credential(&mut self, credential: String) {
        self.credential = Some(credential);
    }

    fn request(&self, method: Method, path: &str) -> (RequestBuilder, String) {
        let url = format!("{}{}", self.base, path);
        let mut builder = self
            .http
            .request(method, &url)
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string());
        if let Some(credential) = &self.credential {
            builder = builder.bearer_auth(credential);
        }
        (builder, url)
    }

    /// Trades a one-time activation code for a device credential.
    pub async fn activate(
        &self,
        activation_code: &str,
        facts: &DeviceFacts,
    ) -> ApiResult<ActivateResponse> {
        let (builder, url) = self.request(Method::POST, "/agent/v1/activate");
        let body = ActivateRequest {
            activation_code: activation_code.to_string(),
            facts: facts.clone(),
        };
        let (content, _) = send(builder.json(&body), &url).await?;
        required(content, &url)
    }

    /// Long-polls for the next job, waiting up to `wait` on the server.
    /// Returns `None` when no job arrived in that time.
    pub async fn next_job(
        &self,
        facts: &DeviceFacts,
        wait: Duration,
    ) -> ApiResult<Option<AgentJob>> {
        let (builder, url) = self.request(Method::POST, "/agent/v1/jobs/next");
        let builder = builder
            .query(&[("waitSecs", wait.as_secs().to_string())])
            .json(facts)
            .timeout(wait + Duration::from_secs(30));
        let (content, _) = send(builder, &url).await?;
        Ok(content)
    }

    pub async fn report_progress(
        &self,
        job_id: i64,
        report: &ProgressReport,
    ) -> ApiResult<ProgressReply> {
        let (builder, url) =
            self.request(Method::POST, &format!("/agent/v1/jobs/{job_id}/progress"));
        let (content, _) = send(builder.json(report), &url).await?;
        required(content, &url)
    }

    pub async fn report_result(&self, job_id: i64, result: &JobResult) -> ApiResult<()> {
        let (builder, url) = self.request(Method::POST, &format!("/agent/v1/jobs/{job_id}/result"));
        let _: (Option<serde_json::Value>, _) = send(builder.json(result), &url).await?;
        Ok(())
    }
}

/// True for statuses worth retrying: no response, or a server-side failure.
pub fn is_retryable(error: &ApiError) -> bool {
    error.status == 0 || StatusCode::from_u16(error.status).is_ok_and(|s| s.is_server_error())
}
