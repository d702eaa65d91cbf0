//! The embedded S3 endpoint, driven by object_store as a real S3 client and
//! by reqwest through pre-signed URLs.

mod common;

use std::time::Duration;

use edgekeep_server::objects::{DOWNLOAD_URL_EXPIRY, Objects, S3Settings};
use edgekeep_server::s3::load_credentials;
use object_store::ObjectStore;
use object_store::path::Path;

fn settings(server: &common::TestServer, secret: Option<&str>) -> S3Settings {
    let credentials = load_credentials(server.data_dir(), None, None).unwrap();
    S3Settings {
        internal_url: server.server.s3_url.clone(),
        public_url: server.server.s3_url.clone(),
        bucket: "edgekeep".into(),
        access_key: credentials.access_key,
        secret_key: secret.map_or(credentials.secret_key, str::to_string),
    }
}

#[tokio::test]
async fn put_and_get_with_right_key() {
    let server = common::start(&common::StoreChoice::Sqlite).await;
    let objects = Objects::new(&settings(&server, None)).unwrap();
    let store = objects.store();
    let path = Path::from("backups/1/2/MASTER/3.dat");
    store.put(&path, "device state".into()).await.unwrap();

    let bytes = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(&bytes[..], b"device state");
    assert_eq!(
        objects.head("backups/1/2/MASTER/3.dat").await.unwrap(),
        Some(12)
    );
    assert_eq!(
        objects.head("backups/1/2/MASTER/4.dat").await.unwrap(),
        None
    );
    server.stop().await;
}

#[tokio::test]
async fn wrong_secret_key_is_rejected() {
    let server = common::start(&common::StoreChoice::Sqlite).await;
    let objects = Objects::new(&settings(&server, Some("not-the-secret"))).unwrap();
    let error = objects
        .store()
        .put(&Path::from("x.dat"), "data".into())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("403") || error.to_string().contains("SignatureDoesNotMatch"),
        "{error}"
    );
    server.stop().await;
}

#[tokio::test]
async fn presigned_get_works_without_auth_header() {
    let server = common::start(&common::StoreChoice::Sqlite).await;
    let objects = Objects::new(&settings(&server, None)).unwrap();
    objects.put("a/b.dat", "payload".into()).await.unwrap();

    let url = objects
        .signed_get("a/b.dat", DOWNLOAD_URL_EXPIRY)
        .await
        .unwrap();
    assert!(url.contains("X-Amz-Expires=604800"), "{url}");
    assert!(url.starts_with(&server.server.s3_url), "{url}");
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "payload");
    server.stop().await;
}

#[tokio::test]
async fn presigned_put_stores_object() {
    let server = common::start(&common::StoreChoice::Sqlite).await;
    let objects = Objects::new(&settings(&server, None)).unwrap();
    let url = objects
        .signed_put("uploads/1.dat", Duration::from_secs(60))
        .await
        .unwrap();
    let response = reqwest::Client::new()
        .put(&url)
        .body("uploaded")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(objects.head("uploads/1.dat").await.unwrap(), Some(8));
    server.stop().await;
}

#[tokio::test]
async fn changed_signature_is_rejected() {
    let server = common::start(&common::StoreChoice::Sqlite).await;
    let objects = Objects::new(&settings(&server, None)).unwrap();
    objects.put("a.dat", "x".into()).await.unwrap();
    let url = objects
        .signed_get("a.dat", Duration::from_secs(60))
        .await
        .unwrap();

    let position = url.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
    let mut tampered = url.clone();
    let first = &url[position..position + 1];
    let replacement = if first == "0" { "1" } else { "0" };
    tampered.replace_range(position..position + 1, replacement);
    let response = reqwest::get(&tampered).await.unwrap();
    assert_eq!(response.status(), 403);
    server.stop().await;
}

#[tokio::test]
async fn url_signed_with_other_secret_is_rejected() {
    let server = common::start(&common::StoreChoice::Sqlite).await;
    let objects = Objects::new(&settings(&server, None)).unwrap();
    objects.put("a.dat", "x".into()).await.unwrap();
    let forger = Objects::new(&settings(&server, Some("another-secret"))).unwrap();
    let url = forger
        .signed_get("a.dat", Duration::from_secs(60))
        .await
        .unwrap();
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 403);
    server.stop().await;
}

#[tokio::test]
async fn expired_url_is_rejected() {
    let server = common::start(&common::StoreChoice::Sqlite).await;
    let objects = Objects::new(&settings(&server, None)).unwrap();
    objects.put("a.dat", "x".into()).await.unwrap();
    let url = objects
        .signed_get("a.dat", Duration::from_secs(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 403);
    let body = response.text().await.unwrap();
    assert!(body.contains("AccessDenied"), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn credentials_file_is_private_and_stable() {
    use std::os::unix::fs::PermissionsExt;

    let server = common::start(&common::StoreChoice::Sqlite).await;
    let path = server.data_dir().join("s3-credentials.json");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let first = load_credentials(server.data_dir(), None, None).unwrap();
    let dir = server.stop().await;

    let again = common::start_with(dir, &common::StoreChoice::Sqlite, |_| {}).await;
    let second = load_credentials(again.data_dir(), None, None).unwrap();
    assert_eq!(first.access_key, second.access_key);
    assert_eq!(first.secret_key, second.secret_key);
    again.stop().await;
}
