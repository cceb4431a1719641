//! The published checksum of an image, and the check that the repave step wrote exactly
//! that image (`[redfish.images]`).

use std::time::Duration;

use bm_provider::ProviderError;
use tokio_util::sync::CancellationToken;

/// The line the repave command prints with the SHA-256 of what it wrote, e.g.
/// `bm-image-sha256: 9f86d0...`.
pub(crate) const REPORT_PREFIX: &str = "bm-image-sha256:";

/// A lowercase hex SHA-256 from a `sha256sum`-style text (its first word), if it is one.
fn digest(text: &str) -> Option<String> {
    let word = text.split_whitespace().next()?;
    (word.len() == 64 && word.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| word.to_ascii_lowercase())
}

/// Fetches the SHA-256 published at `url`.
///
/// # Errors
///
/// Unavailable when the server does not answer or answers 5xx (it may be restarting);
/// permanent for another status or a body that is not a SHA-256: a person must publish it.
pub(crate) async fn published_sha256(
    http: &reqwest::Client,
    cancel: &CancellationToken,
    url: &str,
    timeout: Duration,
) -> Result<String, ProviderError> {
    let fetch = async {
        let resp = http.get(url).timeout(timeout).send().await.map_err(|e| {
            ProviderError::unavailable(format!("cannot fetch the image checksum {url}: {e}"))
                .with_source(e)
        })?;
        let status = resp.status();
        if status.is_server_error() {
            return Err(ProviderError::unavailable(format!(
                "the image checksum {url} answered {status}"
            )));
        }
        if !status.is_success() {
            return Err(ProviderError::permanent(format!(
                "the image checksum {url} answered {status}: publish the image's SHA-256 there (sha256sum IMAGE > IMAGE.sha256), or fix images.sha256_url"
            )));
        }
        let body = resp.text().await.map_err(|e| {
            ProviderError::unavailable(format!("reading the image checksum {url}: {e}"))
        })?;
        digest(&body).ok_or_else(|| {
            ProviderError::permanent(format!(
                "{url} does not start with a SHA-256 (64 hex digits), as sha256sum writes it"
            ))
        })
    };
    tokio::select! {
        r = fetch => r,
        () = cancel.cancelled() => Err(ProviderError::canceled()),
    }
}

/// Checks what the repave command reported it wrote against the published checksum.
///
/// # Errors
///
/// Permanent when it reported nothing (the command template must print it); transient when
/// the checksums differ (a download or a write went wrong: writing again may succeed).
pub(crate) fn check_written(
    reported: Option<&str>,
    want: &str,
    image: &str,
) -> Result<(), ProviderError> {
    let Some(reported) = reported else {
        return Err(ProviderError::permanent(format!(
            "the repave command did not report the checksum of what it wrote: it must print \
             `{REPORT_PREFIX} HEX` with the SHA-256 of the image as written (e.g. \
             `wget -O- {{image_url}} | tee /dev/sda | sha256sum`)"
        )));
    };
    match digest(reported) {
        Some(got) if got == want => Ok(()),
        Some(got) => Err(ProviderError::transient(format!(
            "the image written for {image} has SHA-256 {got}, not the published {want}: the \
             download or the write corrupted it"
        ))),
        None => Err(ProviderError::permanent(format!(
            "the repave command reported {reported:?} after {REPORT_PREFIX}, not a SHA-256"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bm_provider::ErrorKind;

    const A: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn digests_are_read_as_sha256sum_writes_them() {
        assert_eq!(digest(&format!("{A}  ubuntu.img\n")).as_deref(), Some(A));
        assert_eq!(
            digest(&A.to_ascii_uppercase()).as_deref(),
            Some(A),
            "case does not matter"
        );
        assert_eq!(digest("abc"), None);
        assert_eq!(digest(""), None);
        assert_eq!(digest(&format!("{}zz", &A[..62])), None);
    }

    #[test]
    fn the_written_image_must_be_the_published_one() {
        assert!(check_written(Some(&format!("{A}  -")), A, "img").is_ok());
        let other = A.replace('9', "8");
        let wrong = check_written(Some(&other), A, "img").unwrap_err();
        assert_eq!(wrong.kind(), ErrorKind::Transient, "{wrong}");
        assert!(wrong.to_string().contains("not the published"), "{wrong}");
        let silent = check_written(None, A, "img").unwrap_err();
        assert_eq!(silent.kind(), ErrorKind::Permanent, "{silent}");
        assert!(silent.to_string().contains(REPORT_PREFIX), "{silent}");
        let garbage = check_written(Some("done"), A, "img").unwrap_err();
        assert_eq!(garbage.kind(), ErrorKind::Permanent, "{garbage}");
    }
}
