//! The embedded S3 endpoint: s3s with the s3s-fs backend rooted at
//! `DATA/objects`, on its own listener.
//!
//! s3s 0.14 checks SigV4 header signatures and pre-signed query signatures,
//! and rejects a pre-signed URL once `X-Amz-Date + X-Amz-Expires` has
//! passed, so no extra layer is needed (the `s3_endpoint` tests pin both).
//! s3s-fs 0.14 writes each object to a temporary file and renames it into
//! place, so GET and HEAD never see a partly written object.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use serde::{Deserialize, Serialize};
use std::io::Write;

/// Access key and secret key of the embedded endpoint.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct S3Credentials {
    pub access_key: String,
    pub secret_key: String,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

/// Returns the configured credentials, or those in
/// `DATA/s3-credentials.json`, generating and storing them (mode 0600) on
/// first start.
pub fn load_credentials(
    data_dir: &Path,
    access_key: Option<&str>,
    secret_key: Option<&str>,
) -> anyhow::Result<S3Credentials> {
    if let (Some(access_key), Some(secret_key)) = (access_key, secret_key) {
        return Ok(S3Credentials {
            access_key: access_key.to_string(),
            secret_key: secret_key.to_string(),
        });
    }
    let path = data_dir.join("s3-credentials.json");
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("failed to read {}", path.display()))?;
        return serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not valid S3 credentials JSON; delete it to generate new credentials",
                path.display()
            )
        });
    }

    let mut key_bytes = [0u8; 10];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut key_bytes);
    let credentials = S3Credentials {
        access_key: format!("EK{}", hex::encode_upper(key_bytes)),
        secret_key: crate::auth::generate_secret(""),
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(serde_json::to_string_pretty(&credentials)?.as_bytes())?;
    file.sync_all()?;
    tracing::info!(path = %path.display(), "generated S3 credentials for the embedded endpoint");
    Ok(credentials)
}

/// Builds the S3 service over `objects_dir`, creating the bucket folder.
pub fn build_service(
    objects_dir: &Path,
    bucket: &str,
    credentials: &S3Credentials,
) -> anyhow::Result<S3Service> {
    std::fs::create_dir_all(objects_dir.join(bucket)).with_context(|| {
        format!(
            "failed to create the bucket folder in {}",
            objects_dir.display()
        )
    })?;
    let backend = s3s_fs::FileSystem::new(objects_dir)
        .map_err(|e| anyhow::anyhow!("failed to open {}: {e:?}", objects_dir.display()))?;
    let mut builder = S3ServiceBuilder::new(backend);
    builder.set_auth(SimpleAuth::from_single(
        credentials.access_key.clone(),
        credentials.secret_key.clone(),
    ));
    Ok(builder.build())
}

/// Deletes the side files that s3s-fs keeps next to each object
/// (`.bucket-B.object-K.internal.json` and `.metadata.json`, with B and K
/// in unpadded URL-safe base64) once their object is gone. s3s-fs 0.14.1
/// removes only the object file on DeleteObject. Side files younger than
/// `grace` are kept, because a PUT in progress may write them before its
/// object. Returns how many files were deleted.
pub fn remove_orphaned_side_files(
    objects_dir: &Path,
    bucket: &str,
    grace: std::time::Duration,
) -> std::io::Result<usize> {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    let bucket_tag = format!(".bucket-{}.object-", URL_SAFE_NO_PAD.encode(bucket));
    let mut removed = 0;
    for entry in std::fs::read_dir(objects_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(&bucket_tag) else {
            continue;
        };
        let Some(encoded_key) = rest
            .strip_suffix(".internal.json")
            .or_else(|| rest.strip_suffix(".metadata.json"))
        else {
            continue;
        };
        // Multipart side files carry `.upload-ID` and are left to s3s-fs.
        let Ok(key) = URL_SAFE_NO_PAD.decode(encoded_key) else {
            continue;
        };
        let Ok(key) = String::from_utf8(key) else {
            continue;
        };
        if objects_dir.join(bucket).join(&key).exists() {
            continue;
        }
        let age = entry.metadata()?.modified()?.elapsed().unwrap_or_default();
        if age < grace {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(removed)
}

/// Wraps the S3 service in an axum router, so it shares the API's serving
/// and graceful shutdown.
pub fn router(service: S3Service) -> Router {
    Router::new().fallback(handle).with_state(service)
}

async fn handle(State(service): State<S3Service>, request: Request) -> Response {
    let request = request.map(s3s::Body::http_body_unsync);
    match service.call(request).await {
        Ok(response) => response.map(Body::new),
        Err(error) => {
            tracing::error!(error = ?error, "embedded S3 request failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}
