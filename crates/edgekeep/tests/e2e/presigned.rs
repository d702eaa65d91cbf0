//! The S3 endpoint (embedded, or Garage) checks SigV4 signatures and expiry
//! of the URLs it is given, and accepts a real S3 client with the right key.

use std::sync::Arc;
use std::time::Duration;

use edgekeep_api::JobState;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ObjectStore, PutPayload};
use reqwest::StatusCode;

use crate::harness::*;
use crate::imports::{import, valid_archive};

/// Replaces the last hex digit of the signature with another one.
fn tamper(url: &str) -> String {
    let mut bytes = url.as_bytes().to_vec();
    let at = url.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    String::from_utf8(bytes).unwrap()
}

async fn presigned_urls_checked_for_signature_key_and_expiry(store: StoreChoice) {
    let server = Server::start(&store);
    let store = Arc::new(server.s3_client(None));
    let key = ObjectPath::from("probe/object.bin");
    store
        .put(&key, PutPayload::from_static(b"probe content"))
        .await
        .unwrap();
    let read = store.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(
        &read[..],
        b"probe content",
        "a real S3 client with the right key works"
    );

    let good = store
        .signed_url(http::Method::GET, &key, Duration::from_secs(3600))
        .await
        .unwrap();
    let response = reqwest::get(good.as_str()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(&response.bytes().await.unwrap()[..], b"probe content");

    let response = reqwest::get(tamper(good.as_str())).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::FORBIDDEN,
        "changed signature"
    );

    let stranger = server.s3_client(Some("not-the-secret-key-of-this-server"));
    let foreign = stranger
        .signed_url(http::Method::GET, &key, Duration::from_secs(3600))
        .await
        .unwrap();
    let response = reqwest::get(foreign.as_str()).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::FORBIDDEN,
        "signed with another key"
    );
    assert!(
        stranger.get(&key).await.is_err(),
        "header auth with another key"
    );

    let short = store
        .signed_url(http::Method::GET, &key, Duration::from_secs(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let response = reqwest::get(short.as_str()).await.unwrap();
    // Garage 2.5.0 rejects an expired pre-signed URL as a bad request, the
    // embedded s3s endpoint as forbidden.
    let expired_status = match server.store.garage() {
        Some(_) => StatusCode::BAD_REQUEST,
        None => StatusCode::FORBIDDEN,
    };
    assert_eq!(response.status(), expired_status, "past its expiry");
    let body = response.text().await.unwrap();
    assert!(!body.contains("probe content"), "{body}");

    let unsigned = format!("{}/{}/probe/object.bin", server.s3, server.bucket());
    let response = reqwest::get(unsigned).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::FORBIDDEN,
        "no signature at all"
    );
}

async fn download_url_with_changed_signature_refused(store: StoreChoice) {
    let server = Server::start(&store);
    let client = server.client();
    let project = client.create_project("p").await.unwrap().id;
    let device = client.create_device(project, "d").await.unwrap().device.id;
    let bytes = valid_archive(server.dir.path(), &server.dir.path().join("a.dat"));
    let job = import(&server, project, device, bytes.clone()).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let timestamp = job.timestamp.unwrap();

    let url = client
        .download_url(project, device, "MASTER", timestamp)
        .await
        .unwrap();
    assert!(url.contains("X-Amz-Expires=604800"));
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap().to_vec(), bytes);
    let response = reqwest::get(tamper(&url)).await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    // An upload URL cannot be turned into a download, nor the other way.
    let put = reqwest::Client::new()
        .put(&url)
        .body("overwrite")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::FORBIDDEN);
}

e2e_tests!(
    presigned_urls_checked_for_signature_key_and_expiry,
    download_url_with_changed_signature_refused,
);
