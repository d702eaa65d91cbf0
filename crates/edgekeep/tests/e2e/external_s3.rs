//! A server on an external S3 service (Garage) starts no embedded endpoint,
//! names the external one in `endpoints.json`, and fails at start with a
//! message that names the endpoint and bucket when it cannot list the
//! bucket.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::database::GARAGE_BUCKET;
use crate::garage::Garage;
use crate::harness::*;

async fn endpoints_name_the_s3_service_in_use(store: StoreChoice) {
    let server = Server::start(&store);
    let generated_credentials = server.data_dir().join("s3-credentials.json");
    match store.garage() {
        Some(garage) => {
            assert_eq!(server.s3, garage.endpoint);
            assert!(
                !generated_credentials.exists(),
                "no embedded endpoint credentials with an external S3"
            );
            assert!(
                !server.data_dir().join("objects").exists(),
                "no embedded object folder with an external S3"
            );
            assert!(
                server.log().contains("using an external S3 service"),
                "{}",
                server.log()
            );
        }
        None => {
            assert!(server.s3.starts_with("http://127.0.0.1:"), "{}", server.s3);
            assert!(generated_credentials.exists());
        }
    }
}

e2e_tests!(endpoints_name_the_s3_service_in_use);

/// Runs `edgekeep server` with an external S3 configuration that must fail,
/// and returns its output.
async fn failed_start_output(configure: impl FnOnce(&mut Command)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(BIN);
    command
        .args(["server", "--data-dir"])
        .arg(dir.path().join("server"))
        .args(["--listen", "127.0.0.1:0"])
        .env("EDGEKEEP_ADMIN_TOKEN", format!("ek_{}", "cd".repeat(32)))
        .env_remove("EDGEKEEP_DATABASE_URL")
        .env_remove("EDGEKEEP_S3_ACCESS_KEY")
        .env_remove("EDGEKEEP_S3_SECRET_KEY")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    configure(&mut command);
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + STEP_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not fail within {STEP_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success(), "the server start must fail");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn start_garage() -> Option<Garage> {
    Garage::start(GARAGE_BUCKET)
}

/// Points `command` at the Garage cluster, with the given bucket, region
/// and secret key in place of the right ones.
fn point_at(command: &mut Command, garage: &Garage, bucket: &str, region: &str, secret_key: &str) {
    command
        .args(["--s3-endpoint", &garage.endpoint])
        .args(["--s3-region", region])
        .args(["--bucket", bucket])
        .env("EDGEKEEP_S3_ACCESS_KEY", &garage.access_key)
        .env("EDGEKEEP_S3_SECRET_KEY", secret_key);
}

#[tokio::test(flavor = "multi_thread")]
async fn start_fails_on_missing_bucket() {
    let Some(garage) = tokio::task::spawn_blocking(start_garage).await.unwrap() else {
        return;
    };
    let output = failed_start_output(|command| {
        point_at(
            command,
            &garage,
            "no-such-bucket",
            &garage.region,
            &garage.secret_key,
        );
    })
    .await;
    assert!(output.contains(&garage.endpoint), "{output}");
    assert!(output.contains("no-such-bucket"), "{output}");
    assert!(output.contains("NoSuchBucket"), "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn start_fails_on_wrong_secret_key() {
    let Some(garage) = tokio::task::spawn_blocking(start_garage).await.unwrap() else {
        return;
    };
    let wrong_secret = "0".repeat(64);
    let output = failed_start_output(|command| {
        point_at(
            command,
            &garage,
            &garage.bucket,
            &garage.region,
            &wrong_secret,
        );
    })
    .await;
    assert!(output.contains(&garage.endpoint), "{output}");
    assert!(output.contains(&garage.bucket), "{output}");
    assert!(output.contains("403"), "{output}");
    assert!(!output.contains(&garage.secret_key), "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn start_fails_on_wrong_region() {
    let Some(garage) = tokio::task::spawn_blocking(start_garage).await.unwrap() else {
        return;
    };
    let output = failed_start_output(|command| {
        point_at(
            command,
            &garage,
            &garage.bucket,
            "eu-west-3",
            &garage.secret_key,
        );
    })
    .await;
    assert!(output.contains(&garage.endpoint), "{output}");
    assert!(output.contains("AuthorizationHeaderMalformed"), "{output}");
    assert!(output.contains("eu-west-3"), "{output}");
    assert!(output.contains("--s3-region"), "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn start_without_credentials_names_variables() {
    // The credentials are checked before any request, so the endpoint is
    // never contacted.
    let output = failed_start_output(|command| {
        command.args(["--s3-endpoint", "http://127.0.0.1:9"]);
    })
    .await;
    assert!(output.contains("AWS_ACCESS_KEY_ID"), "{output}");
    assert!(output.contains("EDGEKEEP_S3_ACCESS_KEY"), "{output}");
}
