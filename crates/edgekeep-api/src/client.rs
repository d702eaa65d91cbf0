//! HTTP clients for the REST API ([`Client`]) and the agent protocol
//! ([`AgentClient`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
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
        let message = if err.is_timeout() {
            format!(
                "request to {url} timed out: {err}; check that the server is running and \
                 responding"
            )
        } else {
            format!("request to {url} failed: {err}; check that the server is running")
        };
        ApiError { status: 0, message }
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
///
/// It has one or more server base URLs and sends every call to the current
/// one. A call that gets no response, or a 502, 503 or 504, moves
/// the client on to the next URL in the list (round robin), so the caller's
/// retry and all later calls go to another server replica. Clones share the
/// current URL and the id of the last job received.
#[derive(Debug, Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    servers: Arc<ServerList>,
    timeouts: AgentTimeouts,
    credential: Option<String>,
    /// Id of the last job a poll of this client (or a clone) received; 0
    /// before the first one.
    last_received_job: Arc<AtomicI64>,
}

/// Request timeouts of the [`AgentClient`] calls. A call that times out is a
/// transport error (status 0), so it moves the client on to the next server
/// like a refused connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentTimeouts {
    /// Maximum time of an activation.
    pub activate: Duration,
    /// Time a long poll may take beyond the wait it requests from the server.
    pub poll_margin: Duration,
    /// Maximum time of a progress report.
    pub progress: Duration,
    /// Maximum time of a result report.
    pub result: Duration,
}

impl Default for AgentTimeouts {
    fn default() -> Self {
        AgentTimeouts {
            activate: Duration::from_secs(30),
            poll_margin: Duration::from_secs(30),
            progress: Duration::from_secs(30),
            // A success report for a backup returns only after the server has
            // downloaded, verified and copied the upload, which for a few GB
            // takes minutes. 15 minutes covers about 60 GB at 70 MB/s for the
            // three steps together (an assumption, not a measurement). A
            // report that times out is repeated on the next server, which
            // validates the same upload again and lists the backup once, so
            // a bound that is too short costs a second validation, not the
            // backup.
            result: Duration::from_secs(15 * 60),
        }
    }
}

/// The server base URLs of an [`AgentClient`] and the index of the one in
/// use.
#[derive(Debug)]
struct ServerList {
    urls: Vec<String>,
    current: AtomicUsize,
}

impl ServerList {
    fn new(urls: Vec<String>) -> Self {
        ServerList {
            urls,
            current: AtomicUsize::new(0),
        }
    }

    /// Returns the index and base URL of the server in use.
    fn current(&self) -> (usize, &str) {
        let index = self.current.load(Ordering::SeqCst) % self.urls.len();
        (index, &self.urls[index])
    }

    /// Moves on to the server after `failed`, unless another call has
    /// already moved on from it. Without that check, two calls failing on
    /// the same server at once would skip the server after it.
    fn move_on_from(&self, failed: usize) {
        let next = (failed + 1) % self.urls.len();
        let _ = self
            .current
            .compare_exchange(failed, next, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Splits a comma-separated list of server base URLs, such as
/// `http://10.0.0.5:8080,http://10.0.0.6:8080`, trimming spaces and
/// trailing slashes and dropping empty items.
pub fn parse_server_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(|url| url.trim().trim_end_matches('/'))
        .filter(|url| !url.is_empty())
        .map(str::to_string)
        .collect()
}

/// Builds the HTTP client of an agent, for agent protocol calls and
/// pre-signed transfers. Each client loads its own copy of the TLS root
/// certificates, so agents that share a process should share one client.
pub fn agent_http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .expect("the TLS backend initialises")
}

/// True when an agent call should move on to the next server: no response
/// arrived, or a proxy or load balancer reported the server down or slow.
pub fn is_server_unavailable(error: &ApiError) -> bool {
    matches!(error.status, 0 | 502 | 503 | 504)
}

impl AgentClient {
    /// Creates a client for one server base URL, such as
    /// `http://manager.plant.local:8080`, or for a comma-separated list of
    /// replica base URLs (see [`parse_server_urls`]). Calls start at the
    /// first URL.
    pub fn new(base_urls: &str, credential: Option<String>) -> Self {
        Self::with_http(agent_http_client(), base_urls, credential)
    }

    /// Creates a client like [`AgentClient::new`] that sends its calls
    /// through `http`, so many agents in one process, such as a fleet
    /// simulator's, can share one connection pool and TLS configuration.
    pub fn with_http(http: reqwest::Client, base_urls: &str, credential: Option<String>) -> Self {
        let mut urls = parse_server_urls(base_urls);
        if urls.is_empty() {
            // An empty list still yields a client; its calls fail with a
            // transport error that names the empty URL.
            urls.push(String::new());
        }
        AgentClient {
            http,
            servers: Arc::new(ServerList::new(urls)),
            timeouts: AgentTimeouts::default(),
            credential,
            last_received_job: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Replaces the request timeouts of the calls. Clones made after this
    /// keep the new timeouts and still share the server in use.
    pub fn with_timeouts(mut self, timeouts: AgentTimeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Returns the request timeouts of the calls.
    pub fn timeouts(&self) -> AgentTimeouts {
        self.timeouts
    }

    /// Returns the base URL the next call goes to.
    pub fn base_url(&self) -> &str {
        self.servers.current().1
    }

    /// Returns every server base URL, in the order the client tries them.
    pub fn base_urls(&self) -> &[String] {
        &self.servers.urls
    }

    /// Returns the id of the last job a poll received, if any.
    pub fn last_received_job(&self) -> Option<i64> {
        Some(self.last_received_job.load(Ordering::SeqCst)).filter(|id| *id > 0)
    }

    pub fn set_credential(&mut self, credential: String) {
        self.credential = Some(credential);
    }

    /// Builds a request to the current server. Returns the builder, the full
    /// URL and the server's index for [`AgentClient::send`].
    fn request(&self, method: Method, path: &str) -> (RequestBuilder, String, usize) {
        let (index, base) = self.servers.current();
        let url = format!("{base}{path}");
        let mut builder = self
            .http
            .request(method, &url)
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string());
        if let Some(credential) = &self.credential {
            builder = builder.bearer_auth(credential);
        }
        (builder, url, index)
    }

    /// Sends a request built by [`AgentClient::request`] and moves on to the
    /// next server when server `index` is unavailable.
    async fn send<T: DeserializeOwned>(
        &self,
        builder: RequestBuilder,
        url: &str,
        index: usize,
    ) -> ApiResult<(Option<T>, Option<i64>)> {
        let result = send(builder, url).await;
        if let Err(error) = &result
            && is_server_unavailable(error)
        {
            self.servers.move_on_from(index);
        }
        result
    }

    /// Trades a one-time activation code for a device credential.
    pub async fn activate(
        &self,
        activation_code: &str,
        facts: &DeviceFacts,
    ) -> ApiResult<ActivateResponse> {
        let (builder, url, index) = self.request(Method::POST, "/agent/v1/activate");
        let body = ActivateRequest {
            activation_code: activation_code.to_string(),
            facts: facts.clone(),
        };
        let builder = builder.json(&body).timeout(self.timeouts.activate);
        let (content, _) = self.send(builder, &url, index).await?;
        required(content, &url)
    }

    /// Long-polls for the next job, waiting up to `wait` on the server.
    /// Returns `None` when no job arrived in that time.
    ///
    /// The poll carries the id of the last job this client received as
    /// `lastJobId`, so the server can hand out again a job whose earlier
    /// hand-out never arrived.
    pub async fn next_job(
        &self,
        facts: &DeviceFacts,
        wait: Duration,
    ) -> ApiResult<Option<AgentJob>> {
        let (builder, url, index) = self.request(Method::POST, "/agent/v1/jobs/next");
        let mut query = vec![("waitSecs", wait.as_secs().to_string())];
        if let Some(last) = self.last_received_job() {
            query.push(("lastJobId", last.to_string()));
        }
        let builder = builder
            .query(&query)
            .json(facts)
            .timeout(wait + self.timeouts.poll_margin);
        let (content, _): (Option<AgentJob>, _) = self.send(builder, &url, index).await?;
        if let Some(job) = &content {
            self.last_received_job.store(job.job_id(), Ordering::SeqCst);
        }
        Ok(content)
    }

    pub async fn report_progress(
        &self,
        job_id: i64,
        report: &ProgressReport,
    ) -> ApiResult<ProgressReply> {
        let path = format!("/agent/v1/jobs/{job_id}/progress");
        let (builder, url, index) = self.request(Method::POST, &path);
        let builder = builder.json(report).timeout(self.timeouts.progress);
        let (content, _) = self.send(builder, &url, index).await?;
        required(content, &url)
    }

    pub async fn report_result(&self, job_id: i64, result: &JobResult) -> ApiResult<()> {
        let path = format!("/agent/v1/jobs/{job_id}/result");
        let (builder, url, index) = self.request(Method::POST, &path);
        let builder = builder.json(result).timeout(self.timeouts.result);
        let _: (Option<serde_json::Value>, _) = self.send(builder, &url, index).await?;
        Ok(())
    }
}

/// True for statuses worth retrying: no response, or a server-side failure.
pub fn is_retryable(error: &ApiError) -> bool {
    error.status == 0 || StatusCode::from_u16(error.status).is_ok_and(|s| s.is_server_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Returns the address of a loopback port that nothing listens on.
    async fn closed_port() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        format!("http://{address}")
    }

    /// Accepts connections and reads the requests but never responds, as a
    /// stopped (`kill -STOP`) or hung server does.
    async fn frozen_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut open_streams = Vec::new();
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut buffer = vec![0u8; 16 * 1024];
                let _ = stream.read(&mut buffer).await;
                open_streams.push(stream);
            }
        });
        format!("http://{address}")
    }

    /// Serves every request with `status` and an envelope whose content fits
    /// the call: an activation response, a progress reply that does not
    /// cancel, or `null` for any other path.
    async fn fixed_server(status: u16) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    // The requests in these tests fit in one read.
                    let mut buffer = vec![0u8; 16 * 1024];
                    let read = stream.read(&mut buffer).await.unwrap_or(0);
                    let request = String::from_utf8_lossy(&buffer[..read]);
                    let path = request.split(' ').nth(1).unwrap_or_default();
                    let body = if path.ends_with("/activate") {
                        r#"{"code":"200","content":{"projectId":1,"deviceId":2,"deviceUid":"uid-b","deviceName":"line-2","credential":"secret"}}"#
                    } else if path.ends_with("/progress") {
                        r#"{"code":"200","content":{"cancelled":false}}"#
                    } else {
                        r#"{"code":"200","content":null}"#
                    };
                    let response = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        format!("http://{address}")
    }

    fn report() -> ProgressReport {
        ProgressReport {
            progress: 0.5,
            message: "packing".into(),
        }
    }

    #[test]
    fn server_list_is_split_and_trimmed() {
        assert_eq!(
            parse_server_urls(" http://a:8080/, http://b:8080 ,,http://c"),
            ["http://a:8080", "http://b:8080", "http://c"]
        );
        assert_eq!(parse_server_urls("http://a:8080"), ["http://a:8080"]);
        assert!(parse_server_urls(" , ").is_empty());
    }

    #[test]
    fn concurrent_failures_move_on_once() {
        let servers = ServerList::new(vec!["a".into(), "b".into(), "c".into()]);
        // Two calls that both used server 0 fail: the second must not skip
        // server 1.
        servers.move_on_from(0);
        servers.move_on_from(0);
        assert_eq!(servers.current(), (1, "b"));
        servers.move_on_from(1);
        servers.move_on_from(2);
        assert_eq!(servers.current(), (0, "a"), "the list wraps around");
    }

    #[tokio::test]
    async fn unreachable_server_moves_client_to_next() {
        let dead = closed_port().await;
        let live = fixed_server(200).await;
        let client = AgentClient::new(&format!("{dead},{live}"), None);
        assert_eq!(client.base_url(), dead);

        let error = client.report_progress(7, &report()).await.unwrap_err();
        assert_eq!(error.status, 0);
        assert_eq!(client.base_url(), live, "the next call goes elsewhere");
        let reply = client.report_progress(7, &report()).await.unwrap();
        assert!(!reply.cancelled);
        assert_eq!(client.base_url(), live, "a working server is kept");

        // Clones share the server in use.
        let clone = client.clone();
        assert_eq!(clone.base_url(), live);
    }

    #[tokio::test]
    async fn gateway_errors_move_client_and_others_do_not() {
        for (status, moves) in [
            (502, true),
            (503, true),
            (504, true),
            (500, false),
            (409, false),
        ] {
            let first = fixed_server(status).await;
            let second = fixed_server(200).await;
            let client = AgentClient::new(&format!("{first},{second}"), None);
            let error = client.report_progress(7, &report()).await.unwrap_err();
            assert_eq!(error.status, status);
            let expected = if moves { &second } else { &first };
            assert_eq!(client.base_url(), expected, "after HTTP {status}");
        }
    }

    fn facts() -> DeviceFacts {
        DeviceFacts {
            arch: "x86_64".into(),
            platform_version: "2.1.0".into(),
            agent_version: "0.1.0".into(),
            hostname: "line-2".into(),
        }
    }

    /// Returns a client whose first server is frozen and whose second
    /// responds, with every call limited to `timeout`.
    async fn client_with_frozen_first(timeout: Duration) -> (AgentClient, String, String) {
        let frozen = frozen_server().await;
        let live = fixed_server(200).await;
        let timeouts = AgentTimeouts {
            activate: timeout,
            poll_margin: timeout,
            progress: timeout,
            result: timeout,
        };
        let client = AgentClient::new(&format!("{frozen},{live}"), None).with_timeouts(timeouts);
        (client, frozen, live)
    }

    /// Asserts that a call to the frozen server failed as a timeout within
    /// a few multiples of `timeout`, and that the client moved on to `live`.
    fn assert_timed_out_and_moved(
        error: &ApiError,
        elapsed: Duration,
        timeout: Duration,
        client: &AgentClient,
        live: &str,
    ) {
        assert_eq!(error.status, 0, "{error}");
        assert!(error.message.contains("timed out"), "{error}");
        assert!(elapsed >= timeout, "returned after {elapsed:?}");
        assert!(elapsed < timeout * 10, "returned after {elapsed:?}");
        assert_eq!(client.base_url(), live, "the next call goes elsewhere");
    }

    #[tokio::test]
    async fn frozen_server_activation_moves_on() {
        let timeout = Duration::from_millis(300);
        let (client, frozen, live) = client_with_frozen_first(timeout).await;
        assert_eq!(client.base_url(), frozen);

        let started = std::time::Instant::now();
        let error = client.activate("code-1", &facts()).await.unwrap_err();
        assert_timed_out_and_moved(&error, started.elapsed(), timeout, &client, &live);
        let activated = client.activate("code-1", &facts()).await.unwrap();
        assert_eq!(activated.device_id, 2);
    }

    #[tokio::test]
    async fn frozen_server_progress_moves_on() {
        let timeout = Duration::from_millis(300);
        let (client, _, live) = client_with_frozen_first(timeout).await;

        let started = std::time::Instant::now();
        let error = client.report_progress(7, &report()).await.unwrap_err();
        assert_timed_out_and_moved(&error, started.elapsed(), timeout, &client, &live);
        let reply = client.report_progress(7, &report()).await.unwrap();
        assert!(!reply.cancelled);
    }

    #[tokio::test]
    async fn frozen_server_result_moves_on() {
        let timeout = Duration::from_millis(300);
        let (client, _, live) = client_with_frozen_first(timeout).await;
        let result = JobResult {
            ok: true,
            reason: None,
            size: Some(4096),
            checksum: Some("ab".repeat(32)),
        };

        let started = std::time::Instant::now();
        let error = client.report_result(7, &result).await.unwrap_err();
        assert_timed_out_and_moved(&error, started.elapsed(), timeout, &client, &live);
        client.report_result(7, &result).await.unwrap();
    }

    #[tokio::test]
    async fn frozen_server_poll_moves_on() {
        let timeout = Duration::from_millis(300);
        let (client, _, live) = client_with_frozen_first(timeout).await;
        let wait = Duration::from_secs(1);

        let started = std::time::Instant::now();
        let error = client.next_job(&facts(), wait).await.unwrap_err();
        assert_timed_out_and_moved(&error, started.elapsed(), wait + timeout, &client, &live);
        assert!(client.next_job(&facts(), wait).await.unwrap().is_none());
    }

    #[test]
    fn default_timeouts_bound_every_call() {
        let timeouts = AgentClient::new("http://127.0.0.1:8080", None).timeouts();
        assert_eq!(timeouts, AgentTimeouts::default());
        assert_eq!(timeouts.activate, Duration::from_secs(30));
        assert_eq!(timeouts.poll_margin, Duration::from_secs(30));
        assert_eq!(timeouts.progress, Duration::from_secs(30));
        assert_eq!(timeouts.result, Duration::from_secs(15 * 60));
    }

    #[tokio::test]
    async fn single_server_stays_in_use_after_failure() {
        let dead = closed_port().await;
        let client = AgentClient::new(&format!("{dead}/"), None);
        assert_eq!(client.base_urls(), std::slice::from_ref(&dead));
        client.report_progress(7, &report()).await.unwrap_err();
        assert_eq!(client.base_url(), dead);
    }
}
