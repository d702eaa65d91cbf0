//! Object storage through two S3 clients on the same bucket: one on the
//! internal endpoint for the server's own reads and writes, and one on the
//! public endpoint only for signing URLs, because a SigV4 signature covers
//! the host name.

use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use http::Method;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{ObjectStore, PutPayload};
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};

/// Expiry of URLs handed to agents with a job.
pub const AGENT_URL_EXPIRY: Duration = Duration::from_secs(3600);
/// Expiry of the upload URLs returned by `put`.
pub const UPLOAD_URL_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// Expiry of the download URLs returned by `get`.
pub const DOWNLOAD_URL_EXPIRY: Duration =
    Duration::from_secs(edgekeep_api::DOWNLOAD_URL_EXPIRY_SECS);

/// Location of the bucket and the credentials to reach it.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// Endpoint the server itself uses, such as `http://127.0.0.1:9000`.
    pub internal_url: String,
    /// Endpoint written into pre-signed URLs.
    pub public_url: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

/// An object found by [`Objects::list`].
#[derive(Debug, Clone, PartialEq)]
pub struct StoredObject {
    pub key: String,
    /// Last modification, in milliseconds since the Unix epoch.
    pub modified_ms: i64,
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct Objects {
    internal: Arc<AmazonS3>,
    public: Arc<AmazonS3>,
    bucket: String,
}

fn client(endpoint: &str, settings: &S3Settings) -> Result<AmazonS3> {
    AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_bucket_name(&settings.bucket)
        .with_region("us-east-1")
        .with_access_key_id(&settings.access_key)
        .with_secret_access_key(&settings.secret_key)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .build()
        .map_err(|e| Error::internal(format!("invalid S3 endpoint {endpoint}"), e))
}

impl Objects {
    pub fn new(settings: &S3Settings) -> Result<Self> {
        Ok(Objects {
            internal: Arc::new(client(&settings.internal_url, settings)?),
            public: Arc::new(client(&settings.public_url, settings)?),
            bucket: settings.bucket.clone(),
        })
    }

    /// Returns the client on the internal endpoint.
    pub fn store(&self) -> &AmazonS3 {
        &self.internal
    }

    /// Returns the object's size, or `None` when it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<u64>> {
        match self.internal.head(&Path::from(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Lists the objects whose keys start with `prefix`, such as `uploads/`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<StoredObject>> {
        let mut stream = self.internal.list(Some(&Path::from(prefix)));
        let mut objects = Vec::new();
        while let Some(meta) = stream.next().await {
            let meta = meta?;
            objects.push(StoredObject {
                key: meta.location.to_string(),
                modified_ms: meta.last_modified.timestamp_millis(),
                size: meta.size,
            });
        }
        Ok(objects)
    }

    /// Streams the object into a local file and returns its size.
    pub async fn download(&self, key: &str, to: &FsPath) -> Result<u64> {
        let result = self
            .internal
            .get(&Path::from(key))
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => {
                    Error::NotFound(format!("object {key} not found in bucket {}", self.bucket))
                }
                other => other.into(),
            })?;
        let mut file = tokio::fs::File::create(to)
            .await
            .map_err(|e| Error::internal(format!("failed to create {}", to.display()), e))?;
        let mut stream = result.into_stream();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .map_err(|e| Error::internal(format!("failed to write {}", to.display()), e))?;
        }
        file.flush()
            .await
            .map_err(|e| Error::internal(format!("failed to write {}", to.display()), e))?;
        Ok(size)
    }

    pub async fn put(&self, key: &str, bytes: bytes::Bytes) -> Result<()> {
        self.internal
            .put(&Path::from(key), PutPayload::from_bytes(bytes))
            .await?;
        Ok(())
    }

    pub async fn copy(&self, from: &str, to: &str) -> Result<()> {
        self.internal
            .copy(&Path::from(from), &Path::from(to))
            .await?;
        Ok(())
    }

    /// Deletes the object; a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.internal.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the object and logs a failure instead of returning it, for
    /// cleanup after another error.
    pub async fn delete_quietly(&self, key: &str) {
        if let Err(error) = self.delete(key).await {
            tracing::warn!(key, error = %error, "failed to delete object");
        }
    }

    /// Signs a GET URL on the public endpoint.
    pub async fn signed_get(&self, key: &str, expires_in: Duration) -> Result<String> {
        self.sign(Method::GET, key, expires_in).await
    }

    /// Signs a PUT URL on the public endpoint.
    pub async fn signed_put(&self, key: &str, expires_in: Duration) -> Result<String> {
        self.sign(Method::PUT, key, expires_in).await
    }

    async fn sign(&self, method: Method, key: &str, expires_in: Duration) -> Result<String> {
        let url = self
            .public
            .signed_url(method, &Path::from(key), expires_in)
            .await?;
        Ok(url.to_string())
    }
}
