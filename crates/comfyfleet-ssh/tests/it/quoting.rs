use super::*;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The exact bytes the remote shell sees as `$1`, as hex.
async fn remote_bytes(client: &SshClient, arg: &str) -> String {
    let out = client
        .run(
            &argv(&[
                "sh",
                "-c",
                r#"printf %s "$1" | od -An -v -tx1 | tr -d ' \n'"#,
                "sh",
                arg,
            ]),
            no_pty(),
        )
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    out.stdout().concat()
}

#[test]
fn shell_quote_round_trips_through_the_real_remote_shell() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let sshd = TestSshd::start_blocking().unwrap();
    let client = rt.block_on(connected(&sshd));
    let mut runner = TestRunner::new(Config {
        cases: 96,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = prop_oneof![
        "[ -~\\n\\t'\"`$;|&()<>*?!#{}\\[\\]\\\\é日]{0,24}",
        any::<String>().prop_map(|s| s.replace('\0', "")),
    ];
    runner
        .run(&strategy, |s| {
            let got = rt.block_on(remote_bytes(&client, &s));
            prop_assert_eq!(got, hex(&s), "arg {:?}", s);
            Ok(())
        })
        .unwrap();
}

#[tokio::test]
async fn nul_bytes_are_rejected() {
    let sshd = TestSshd::start().await.unwrap();
    let client = connected(&sshd).await;
    let err = client
        .exec(&argv(&["printf", "%s", "a\0b"]))
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::InvalidArgument(_)), "{err:?}");
    let err = client.exec(&[]).await.unwrap_err();
    assert!(matches!(err, SshError::InvalidArgument(_)), "{err:?}");
}

#[tokio::test]
async fn injection_payloads_come_back_verbatim_and_run_nothing() {
    let sshd = TestSshd::start().await.unwrap();
    let client = connected(&sshd).await;
    let dir = tempfile::tempdir().unwrap();
    let pwned = dir.path().join(format!("pwned-{}", unique()));
    let p = pwned.display();
    let payloads = [
        format!("; touch {p}"),
        format!("$(touch {p})"),
        format!("`touch {p}`"),
        format!("x\ntouch {p}"),
        format!("--upload-pack=touch {p}"),
        format!("' ; touch {p}; '"),
        format!("\" ; touch {p}; \""),
        format!("&& touch {p} || touch {p} | touch {p}"),
        format!("${{IFS}}touch${{IFS}}{p}"),
        format!("\\'; touch {p} #"),
    ];
    for payload in &payloads {
        let out = client
            .run(&argv(&["printf", "%s\\n", payload]), no_pty())
            .await
            .unwrap();
        assert!(out.status.success(), "{payload:?}: {out:?}");
        assert_eq!(out.stdout().join("\n"), *payload);
        // and on a PTY too
        let out = client
            .run(&argv(&["printf", "%s\\n", payload]), ExecOptions::default())
            .await
            .unwrap();
        assert_eq!(out.stdout().join("\n"), *payload);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pwned.exists(), "an injection payload ran");
}
