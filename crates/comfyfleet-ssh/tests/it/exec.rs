use super::*;

#[tokio::test]
async fn lines_stream_before_exit_in_order() {
    let sshd = TestSshd::start().await.unwrap();
    let client = connected(&sshd).await;
    let mut p = client
        .exec(&argv(&[
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do echo line$i; sleep 0.2; done; exit 3",
        ]))
        .await
        .unwrap();
    let first = p.next_event().await.unwrap();
    assert_eq!(
        first,
        ProcessEvent::Line(Line {
            stream: Stream::Stdout,
            text: "line1".into()
        })
    );
    // the process is still running: the next events are lines, the exit comes last
    let mut rest = Vec::new();
    while let Some(ev) = p.next_event().await {
        rest.push(ev);
    }
    let expected: Vec<ProcessEvent> = (2..=5)
        .map(|i| {
            ProcessEvent::Line(Line {
                stream: Stream::Stdout,
                text: format!("line{i}"),
            })
        })
        .chain([ProcessEvent::Exit(ExitStatus::Code(3))])
        .collect();
    assert_eq!(rest, expected);
}

#[tokio::test]
async fn exit_code_and_stderr_without_pty() {
    let sshd = TestSshd::start().await.unwrap();
    let client = connected(&sshd).await;
    let out = client
        .run(
            &argv(&["sh", "-c", "echo out; echo err >&2; printf tail; exit 42"]),
            no_pty(),
        )
        .await
        .unwrap();
    assert_eq!(out.status, ExitStatus::Code(42));
    assert_eq!(out.stdout(), ["out", "tail"]);
    assert_eq!(out.stderr(), ["err"]);
}

#[tokio::test]
async fn command_timeout_closes_the_command() {
    let sshd = TestSshd::start().await.unwrap();
    let client = connected(&sshd).await;
    let out = client
        .run(
            &argv(&["sleep", "30"]),
            ExecOptions {
                pty: true,
                timeout: Some(Duration::from_millis(300)),
            },
        )
        .await
        .unwrap();
    assert_eq!(out.status, ExitStatus::TimedOut);
}

async fn remote_running(client: &SshClient, marker: &str) -> bool {
    // `[m]arker` does not match pgrep's own command line
    let pattern = format!("[{}]{}", &marker[..1], &marker[1..]);
    let out = client
        .run(&argv(&["pgrep", "-f", &pattern]), no_pty())
        .await
        .unwrap();
    out.status.success()
}

#[tokio::test]
async fn cancel_kills_the_remote_process_group() {
    let sshd = TestSshd::start().await.unwrap();
    let client = connected(&sshd).await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join(format!("marker-{}", unique()));
    let marker_s = marker.to_str().unwrap().to_owned();
    // a loop in a child shell plus a `sleep` grandchild: a whole process group
    let script =
        r#"m="$1"; while true; do echo tick >> "$m"; echo tick; sleep 0.2; done & sleep 300; wait"#;
    let mut p = client
        .exec(&argv(&["sh", "-c", script, "sh", &marker_s]))
        .await
        .unwrap();
    // wait until it runs
    assert!(matches!(p.next_event().await, Some(ProcessEvent::Line(_))));
    assert!(remote_running(&client, &marker_s).await);
    p.cancel();
    let mut last = None;
    while let Some(ev) = p.next_event().await {
        last = Some(ev);
    }
    assert_eq!(last, Some(ProcessEvent::Exit(ExitStatus::Cancelled)));

    // the group is gone: no process left, and the marker stops growing
    let mut gone = false;
    for _ in 0..50 {
        if !remote_running(&client, &marker_s).await {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "remote loop survived cancel");
    let len = std::fs::metadata(&marker).unwrap().len();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(std::fs::metadata(&marker).unwrap().len(), len);
}

#[tokio::test]
async fn dropping_the_process_cancels_it() {
    let sshd = TestSshd::start().await.unwrap();
    let client = connected(&sshd).await;
    let tag = format!("dropme-{}", unique());
    let script = format!("echo up; sleep 300; : {tag}");
    let mut p = client.exec(&argv(&["sh", "-c", &script])).await.unwrap();
    assert!(matches!(p.next_event().await, Some(ProcessEvent::Line(_))));
    assert!(remote_running(&client, &tag).await);
    drop(p);
    let mut gone = false;
    for _ in 0..50 {
        if !remote_running(&client, &tag).await {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "remote command survived drop");
}
