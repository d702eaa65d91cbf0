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

/// Signing region and addressing style of requests to the bucket. The
/// default fits the embedded endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct S3Addressing {
    pub region: String,
    /// `true` puts the bucket in the host name (`http://BUCKET.HOST/KEY`),
    /// `false` in the path (`http://HOST/BUCKET/KEY`).
    pub virtual_hosted: bool,
}

impl Default for S3Addressing {
    fn default() -> Self {
        S3Addressing {
            region: crate::config::DEFAULT_S3_REGION.to_string(),
            virtual_hosted: false,
        }
    }
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

fn client(endpoint: &str, settings: &S3Settings, addressing: &S3Addressing) -> Result<AmazonS3> {
    // object_store 0.12 expects the bucket in the endpoint's host name for
    // virtual-hosted-style requests.
    let endpoint = if addressing.virtual_hosted {
        virtual_hosted_endpoint(endpoint, &settings.bucket)
    } else {
        endpoint.to_string()
    };
    AmazonS3Builder::new()
        .with_endpoint(&endpoint)
        .with_bucket_name(&settings.bucket)
        .with_region(&addressing.region)
        .with_access_key_id(&settings.access_key)
        .with_secret_access_key(&settings.secret_key)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(addressing.virtual_hosted)
        .build()
        .map_err(|e| Error::internal(format!("invalid S3 endpoint {endpoint}"), e))
}

/// Puts the bucket in front of the endpoint's host name, so
/// `https://s3.example.com` becomes `https://BUCKET.s3.example.com`. An
/// endpoint whose host already starts with the bucket is kept.
pub fn virtual_hosted_endpoint(endpoint: &str, bucket: &str) -> String {
    let endpoint = endpoint.trim_end_matches('/');
    let (scheme, host) = endpoint.split_once("://").unwrap_or(("https", endpoint));
    if host.starts_with(&format!("{bucket}.")) {
        return format!("{scheme}://{host}");
    }
    format!("{scheme}://{bucket}.{host}")
}

impl Objects {
    /// Builds path-style clients signed for `us-east-1`, as the embedded
    /// endpoint expects.
    pub fn new(settings: &S3Settings) -> Result<Self> {
        Self::with_addressing(settings, &S3Addressing::default())
    }

    /// Builds the clients with the given region and addressing style.
    pub fn with_addressing(settings: &S3Settings, addressing: &S3Addressing) -> Result<Self> {
        Ok(Objects {
            internal: Arc::new(client(&settings.internal_url, settings, addressing)?),
            public: Arc::new(client(&settings.public_url, settings, addressing)?),
            bucket: settings.bucket.clone(),
        })
    }

    /// Lists the top level of the bucket, which fails when the endpoint,
    /// the bucket or the credentials are wrong.
    pub async fn check_bucket(&self) -> object_store::Result<()> {
        self.internal.list_with_delimiter(None).await?;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_hosted_endpoint_prefixes_bucket() {
        assert_eq!(
            virtual_hosted_endpoint("https://s3.example.com/", "edgekeep"),
            "https://edgekeep.s3.example.com"
        );
        assert_eq!(
            virtual_hosted_endpoint("http://minio.lan:9000", "fleet"),
            "http://fleet.minio.lan:9000"
        );
        assert_eq!(
            virtual_hosted_endpoint("https://edgekeep.s3.example.com", "edgekeep"),
            "https://edgekeep.s3.example.com"
        );
    }
}
