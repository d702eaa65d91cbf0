//! Projects, devices, jobs and tokens.

use edgekeep_api::{
    CreateToken, CreatedToken, Device, DeviceActivation, Job, JobKind, JobState, Project, TokenInfo,
};

use super::Manager;
use crate::auth::{ACTIVATION_PREFIX, Caller, TOKEN_PREFIX, generate_secret, hash_secret};
use crate::error::{Error, Result};
use crate::store::JobFilter;

/// Maximum length of a project, device or token name, in characters.
pub const MAX_NAME_CHARS: usize = 200;

/// Checks a name after trimming: 1 to [`MAX_NAME_CHARS`] characters and no
/// control characters.
fn check_name(kind: &str, name: &str) -> Result<()> {
    let name = name.trim();
    let length = name.chars().count();
    if length == 0 || length > MAX_NAME_CHARS {
        return Err(Error::BadRequest(format!(
            "invalid {kind} name: expected 1 to {MAX_NAME_CHARS} characters, got {length}"
        )));
    }
    if let Some(control) = name.chars().find(|c| c.is_control()) {
        return Err(Error::BadRequest(format!(
            "invalid {kind} name {name:?}: control character {control:?} is not allowed"
        )));
    }
    Ok(())
}

impl Manager {
    pub async fn create_project(&self, caller: &Caller, name: &str) -> Result<Project> {
        caller.require_unscoped()?;
        check_name("project", name)?;
        let project = self
            .store
            .create_project(name.trim(), crate::now_ms())
            .await?;
        tracing::info!(project_id = project.id, by = %caller.name, "created project");
        Ok(project)
    }

    pub async fn list_projects(&self, caller: &Caller) -> Result<Vec<Project>> {
        self.store.list_projects(caller.project_ids.clone()).await
    }

    /// Returns the project after checking the token's scope (403) and that
    /// it exists (404).
    pub async fn project(&self, caller: &Caller, project_id: i64) -> Result<Project> {
        caller.check_project(project_id)?;
        self.store
            .project(project_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("project {project_id} not found")))
    }

    /// Returns the device after checking the project as [`Manager::project`].
    pub async fn device(&self, caller: &Caller, project_id: i64, device_id: i64) -> Result<Device> {
        self.project(caller, project_id).await?;
        let device = self
            .store
            .device(project_id, device_id)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "device {device_id} not found in project {project_id}"
                ))
            })?;
        Ok(self.with_online(device))
    }

    pub async fn create_device(
        &self,
        caller: &Caller,
        project_id: i64,
        name: &str,
    ) -> Result<DeviceActivation> {
        self.project(caller, project_id).await?;
        check_name("device", name)?;
        // NOTE: two concurrent requests with the same name can both pass
        // this check, because the schema has no unique index on the name.
        let existing = self.store.list_devices(project_id).await?;
        if let Some(device) = existing.iter().find(|d| d.name == name.trim()) {
            return Err(Error::Conflict(format!(
                "project {project_id} already has a device named {:?} (device {}); choose \
                 another name or use that device",
                device.name, device.id
            )));
        }
        let code = generate_secret(ACTIVATION_PREFIX);
        let now = crate::now_ms();
        let expires_at = now + self.activation_ttl.as_millis() as i64;
        let uid = uuid::Uuid::new_v4().to_string();
        let device = self
            .store
            .create_device(
                project_id,
                name.trim(),
                &uid,
                &hash_secret(&code),
                expires_at,
                now,
            )
            .await?;
        tracing::info!(project_id, device_id = device.id, "created device");
        Ok(DeviceActivation {
            device: self.with_online(device),
            activation_code: code,
            activation_expires_at: expires_at,
        })
    }

    pub async fn list_devices(&self, caller: &Caller, project_id: i64) -> Result<Vec<Device>> {
        self.project(caller, project_id).await?;
        let devices = self.store.list_devices(project_id).await?;
        Ok(devices.into_iter().map(|d| self.with_online(d)).collect())
    }

    /// Issues a new activation code; the device's current credential stops
    /// working.
    pub async fn new_activation_code(
        &self,
        caller: &Caller,
        project_id: i64,
        device_id: i64,
    ) -> Result<DeviceActivation> {
        self.device(caller, project_id, device_id).await?;
        let code = generate_secret(ACTIVATION_PREFIX);
        let expires_at = crate::now_ms() + self.activation_ttl.as_millis() as i64;
        self.store
            .reset_activation(device_id, &hash_secret(&code), expires_at)
            .await?;
        tracing::info!(project_id, device_id, "issued a new activation code");
        let device = self.device(caller, project_id, device_id).await?;
        Ok(DeviceActivation {
            device,
            activation_code: code,
            activation_expires_at: expires_at,
        })
    }

    pub async fn list_jobs(
        &self,
        caller: &Caller,
        project_id: Option<i64>,
        device_id: Option<i64>,
        state: Option<JobState>,
    ) -> Result<Vec<Job>> {
        if let Some(project_id) = project_id {
            self.project(caller, project_id).await?;
        }
        let filter = JobFilter {
            project_id,
            device_id,
            state,
            project_scope: caller.project_ids.clone(),
        };
        self.store.list_jobs(filter).await
    }

    pub async fn job(&self, caller: &Caller, job_id: i64) -> Result<Job> {
        let not_found = || Error::NotFound(format!("job {job_id} not found"));
        let record = self.store.job(job_id).await?.ok_or_else(not_found)?;
        caller.check_project(record.job.project_id)?;
        Ok(record.job)
    }

    /// Cancels a queued job, or a running backup or restore: the agent receives
    /// the cancellation in its next progress reply and rolls back.
    pub async fn cancel_job(&self, caller: &Caller, job_id: i64) -> Result<Job> {
        let job = self.job(caller, job_id).await?;
        if job.state == JobState::Running && job.kind == JobKind::Import {
            return Err(Error::Conflict(format!(
                "import job {job_id} is validating its file and cannot be cancelled"
            )));
        }
        let reason = format!("cancelled by token {}", caller.name);
        let now = crate::now_ms();
        let cancelled = match job.state {
            JobState::Queued | JobState::Running => {
                self.store
                    .finish_job(job_id, job.state, JobState::Cancelled, Some(&reason), now)
                    .await?
            }
            _ => false,
        };
        if !cancelled {
            let current = self.job(caller, job_id).await?;
            return Err(Error::Conflict(format!(
                "job {job_id} is already {}; only queued or running jobs can be cancelled",
                current.state.as_str()
            )));
        }
        tracing::info!(job_id, by = %caller.name, "cancelled job");
        self.job(caller, job_id).await
    }

    pub async fn create_token(
        &self,
        caller: &Caller,
        request: &CreateToken,
    ) -> Result<CreatedToken> {
        caller.require_admin()?;
        check_name("token", &request.name)?;
        if let Some(ids) = &request.project_ids {
            for id in ids {
                self.project(caller, *id).await?;
            }
        }
        let now = crate::now_ms();
        if request.expires_at.is_some_and(|at| at <= now) {
            return Err(Error::BadRequest(format!(
                "invalid expiresAt {}: the time has already passed",
                request.expires_at.unwrap_or_default()
            )));
        }
        let token = generate_secret(TOKEN_PREFIX);
        let info = self
            .store
            .create_token(
                request.name.trim(),
                &hash_secret(&token),
                false,
                request.project_ids.clone(),
                request.expires_at,
                now,
            )
            .await?;
        tracing::info!(token_id = info.id, name = %info.name, "created token");
        Ok(CreatedToken { token, info })
    }

    pub async fn list_tokens(&self, caller: &Caller) -> Result<Vec<TokenInfo>> {
        caller.require_admin()?;
        self.store.list_tokens().await
    }

    pub async fn revoke_token(&self, caller: &Caller, token_id: i64) -> Result<()> {
        caller.require_admin()?;
        if !self.store.revoke_token(token_id, crate::now_ms()).await? {
            return Err(Error::NotFound(format!("token {token_id} not found")));
        }
        tracing::info!(token_id, "revoked token");
        Ok(())
    }
}
