//! The README's curl examples, in order, against a fresh kloudmeter: every answer the
//! README shows is the one the server gives, and every request body the README sends
//! validates against the server's own /openapi.json (and every body the server refuses
//! does not). `.ci/readme-examples.py` does the checking; CI also runs it against
//! `task run` from a fresh tool cache.

use crate::common::*;

#[tokio::test]
async fn readme_examples_answer_as_shown_and_validate_against_the_schema() {
    let nats = Nats::start();
    let km = Km::start(&nats, "meters", &[]).await;
    let root = env!("CARGO_MANIFEST_DIR");
    let base = km.url("");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(tools::python())
            .arg(format!("{root}/.ci/readme-examples.py"))
            .arg(base)
            .arg(format!("{root}/README.md"))
            .output()
    })
    .await
    .unwrap()
    .expect("running .ci/readme-examples.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("README examples ran and answered as shown"),
        "{text}"
    );
}
